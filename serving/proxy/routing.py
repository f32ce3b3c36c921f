"""Where a request goes: LMDeploy's three strategies, cache-aware routing and session affinity.

Each strategy is a small class whose `choose` picks one of the candidate nodes (healthy, serving the
request's model, never empty) and names the branch it took, which /metrics counts, so an operator can
see why traffic went where it did (a cache-aware router that is a black box was SGLang's users'
complaint). Only the cache-aware index and the session ring keep state.

- `random`: weighted by each node's `speed` (LMDeploy's; 1 when a node has none).
- `min_expected_latency` (LMDeploy's default): the fewest requests in flight per unit of speed, ties
  broken at random so a quiet fleet still spreads its requests.
- `min_observed_latency`: the lowest mean of the last 15 request latencies; a node with none yet
  comes first, so a new node is measured (LMDeploy's never got a request).
- `cache_aware`: the node whose recent traffic shares the longest page prefix with the request (named
  as the engine names its KV pages, `prompt_pages`), unless its load exceeds the least loaded node's
  by more than `BALANCE_ABS` requests and `BALANCE_REL` times: then the least loaded (SGLang's rule).
  A request that shares no page with anything starts a new prefix on the node given the fewest of the
  last `RECENT_PLACEMENTS` new prefixes, so prefixes, and the traffic that follows them, spread evenly
  (by requests in flight alone, a lightly loaded fleet would place them at random); one shorter than a
  page goes to the least loaded node.
- `session`: a consistent-hash ring over the nodes, keyed by the `--session-key` header, else the
  request's `user` field (else the interactive `session_id`); a request with neither goes to the
  least loaded node. Adding or dropping a node moves only the sessions that hashed to it.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from serving.proxy.nodes import Node
from serving.proxy.prompt_pages import PromptPages

BALANCE_ABS = 16  # requests in flight
BALANCE_REL = 1.5
DEFAULT_PAGE_SIZE = 64  # for a node that does not say (LMDeploy's --cache-block-seq-len default)
DEFAULT_INDEX_PAGES = 8192  # pages remembered per node that does not say how many it holds
RING_POINTS_PER_NODE = 64
RECENT_PLACEMENTS = 64
# The index remembers twice the pages a node holds: text pages only approximate KV pages, and forgetting
# a prefix the node still holds would move its traffic elsewhere, where remembering one it dropped costs
# one recomputation.
INDEX_SLACK = 2


@dataclass(frozen=True)
class RoutedRequest:
    """What routing reads of a request."""

    model: str | None
    prompt: PromptPages
    session_key: str | None = None  # session routing's key: a header, the user field or a session id


class Choice(NamedTuple):
    node: Node
    branch: str  # why: the strategy's name, or cache_hit / cache_miss / load_balance / session / fallback
    strategy: str
    match: float | None = None  # cache_aware: the share of the request's pages the chosen node had seen


class Strategy:
    name: str

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def choose(self, nodes: Sequence[Node], request: RoutedRequest) -> Choice:
        raise NotImplementedError

    def forget(self, url: str) -> None:
        """Drop what is kept about a node: it left, or came back from a restart with an empty cache."""


def least_loaded(nodes: Sequence[Node], rng: random.Random) -> Node:
    """The node with the fewest requests in flight per unit of speed (ties at random)."""
    shuffled = rng.sample(list(nodes), len(nodes))
    return min(shuffled, key=lambda node: node.in_flight / (node.speed or 1))


class RandomStrategy(Strategy):
    name = "random"

    def choose(self, nodes: Sequence[Node], request: RoutedRequest) -> Choice:
        node = self.rng.choices(nodes, weights=[node.speed or 1 for node in nodes])[0]
        return Choice(node, self.name, self.name)


class MinExpectedLatency(Strategy):
    name = "min_expected_latency"

    def choose(self, nodes: Sequence[Node], request: RoutedRequest) -> Choice:
        return Choice(least_loaded(nodes, self.rng), self.name, self.name)


class MinObservedLatency(Strategy):
    name = "min_observed_latency"

    def choose(self, nodes: Sequence[Node], request: RoutedRequest) -> Choice:
        shuffled = self.rng.sample(list(nodes), len(nodes))
        return Choice(min(shuffled, key=lambda node: node.mean_latency), self.name, self.name)


class PageIndex:
    """The page names of a node's recent traffic, least recently seen first, at most `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._keys: OrderedDict[int, None] = OrderedDict()

    def match(self, keys: Sequence[int]) -> int:
        """How many leading pages of `keys` it holds."""
        count = 0
        for key in keys:
            if key not in self._keys:
                break
            count += 1
        return count

    def record(self, keys: Sequence[int]) -> None:
        # Tail first, so a prompt's head is the most recent: as in the engine, which releases a sequence's
        # pages tail first and so evicts the pages only it had before the prefix others share.
        for key in reversed(keys):
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)


class CacheAware(Strategy):
    name = "cache_aware"

    def __init__(self, rng: random.Random | None = None):
        super().__init__(rng)
        self._indexes: dict[str, PageIndex] = {}
        self._placed: deque[str] = deque(maxlen=RECENT_PLACEMENTS)  # nodes given the last new prefixes
        self._placed_counts: Counter[str] = Counter()

    def forget(self, url: str) -> None:
        self._indexes.pop(url, None)

    def _index(self, node: Node) -> PageIndex:
        index = self._indexes.get(node.url)
        if index is None:
            capacity = INDEX_SLACK * node.num_pages if node.num_pages else DEFAULT_INDEX_PAGES
            index = self._indexes[node.url] = PageIndex(capacity)
        return index

    def choose(self, nodes: Sequence[Node], request: RoutedRequest) -> Choice:
        keys = {node.url: request.prompt.keys(node.page_size or DEFAULT_PAGE_SIZE) for node in nodes}
        matched = {node.url: self._index(node).match(keys[node.url]) for node in nodes}
        best = max(matched.values())
        shuffled = self.rng.sample(list(nodes), len(nodes))
        if not any(keys.values()):  # shorter than a page: no node can reuse any of it
            node, branch = least_loaded(shuffled, self.rng), "no_prefix"
        elif best:
            node = min((n for n in shuffled if matched[n.url] == best), key=lambda n: n.in_flight)
            branch = "cache_hit"
        else:  # a prefix new to every node: to the one given the fewest new prefixes lately
            node = min(shuffled, key=lambda n: (self._placed_counts[n.url], n.in_flight))
            branch = "cache_miss"
        lightest = min(shuffled, key=lambda n: n.in_flight)
        if node.in_flight - lightest.in_flight > BALANCE_ABS and node.in_flight > BALANCE_REL * lightest.in_flight:
            node, branch = lightest, "load_balance"
        self._index(node).record(keys[node.url])
        if keys[node.url] and not best:
            self._place(node)
        share = matched[node.url] / len(keys[node.url]) if keys[node.url] else 0.0
        return Choice(node, branch, self.name, share)


    def _place(self, node: Node) -> None:
        if len(self._placed) == self._placed.maxlen:
            self._placed_counts[self._placed[0]] -= 1
        self._placed.append(node.url)
        self._placed_counts[node.url] += 1


class SessionRing(Strategy):
    name = "session"

    def __init__(self, rng: random.Random | None = None):
        super().__init__(rng)
        self._ring: tuple[tuple[str, ...], list[int], list[str]] = ((), [], [])

    def choose(self, nodes: Sequence[Node], request: RoutedRequest) -> Choice:
        if request.session_key is None:
            return Choice(least_loaded(nodes, self.rng), "fallback", self.name)
        points, owners = self._points(nodes)
        at = bisect.bisect(points, _stable_hash(request.session_key)) % len(points)
        by_url = {node.url: node for node in nodes}
        return Choice(by_url[owners[at]], "session", self.name)

    def _points(self, nodes: Sequence[Node]) -> tuple[list[int], list[str]]:
        """The ring of these nodes (rebuilt only when the set of nodes changes)."""
        urls = tuple(sorted(node.url for node in nodes))
        if urls != self._ring[0]:
            ring = sorted((_stable_hash(f"{url}#{i}"), url) for url in urls for i in range(RING_POINTS_PER_NODE))
            self._ring = (urls, [point for point, _ in ring], [url for _, url in ring])
        return self._ring[1], self._ring[2]


def _stable_hash(text: str) -> int:
    """The same in every process (Python's str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class AutoStrategy(Strategy):
    """No --routing-strategy: cache_aware when every candidate reports prefix caching (the
    `vllm:cache_config_info` of our api_servers), else LMDeploy's default, min_expected_latency."""

    name = "auto"

    def __init__(self, rng: random.Random | None = None):
        super().__init__(rng)
        self.cache_aware = CacheAware(self.rng)
        self.fallback = MinExpectedLatency(self.rng)

    def forget(self, url: str) -> None:
        self.cache_aware.forget(url)

    def choose(self, nodes: Sequence[Node], request: RoutedRequest) -> Choice:
        if all(node.prefix_caching for node in nodes):
            return self.cache_aware.choose(nodes, request)
        return self.fallback.choose(nodes, request)


def make_strategy(name: str | None, rng: random.Random | None = None) -> Strategy:
    strategies: dict[str | None, type[Strategy]] = {
        None: AutoStrategy,
        "random": RandomStrategy,
        "min_expected_latency": MinExpectedLatency,
        "min_observed_latency": MinObservedLatency,
        "cache_aware": CacheAware,
        "session": SessionRing,
    }
    return strategies[name](rng)
