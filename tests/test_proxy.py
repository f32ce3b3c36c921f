"""The proxy in front of three real api_servers, each its own process serving the built-in demo model on
127.0.0.1, which register themselves with `--proxy-url`. Every start compiles, so the module starts them
once and shares them: the main proxy (user and admin keys, the default strategy: cache_aware, since the
nodes report prefix caching) and one proxy per other strategy, which learns the nodes from a copy of the
main proxy's node file. Which node served a request is read from the nodes' own /metrics.

The fault tests kill a node, so they run last, in file order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from configs.demo import MERGE_WORDS
from tests.http_fixtures import (
    SMALL_BUCKET_FLAGS,
    STARTUP_TIMEOUT_S,
    ServerProcess,
    anthropic_client,
    console_script,
    free_port,
    http,
    openai_client,
)
from tools.bench_serving import sse_lines

MODEL = "xlserve-demo"
USER, ADMIN = "proxy-user-key", "proxy-admin-key"
# 19 usable pages of 16 tokens: the 6-page prefixes of three of the cache test's eight groups and the last
# page of the request running (the rest of its pages is its prefix). cache_aware, which puts three groups at
# most on a node, needs no more; random and one server would need room for all eight.
NUM_PAGES = 20
# The later --num-pages wins. The engine on a thread of the server: a start without a second process to
# import everything into is seconds shorter on CI, and the proxy sees the same HTTP either way.
NODE_FLAGS = [*SMALL_BUCKET_FLAGS, "--num-pages", str(NUM_PAGES), "--no-engine-process"]
STRATEGY_PROXIES = ("random", "min_expected_latency", "min_observed_latency", "session")
# Sampled (the server's default temperature): the nodes that started beside the first one run sampler
# programs it compiled, which once failed on XLA:CPU (program_store's docstring; test_program_store).
STREAM = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 100, "ignore_eos": True, "stream": True}


@dataclass
class Cluster:
    proxy: ServerProcess
    proxy_url: str
    node_file: Path
    nodes: list[ServerProcess]
    node_ports: list[int]
    strategies: dict[str, str]  # strategy -> its proxy's URL
    compile_cache: Path  # JAX's persistent cache and the program store: the first node compiles, the others load

    def start_node(self, index: int) -> ServerProcess:
        command = [console_script("xlserve"), "serve", "api_server", "--server-name", "127.0.0.1", "--server-port",
                   str(self.node_ports[index]), "--proxy-url", self.proxy_url, "--compilation-cache-dir",
                   str(self.compile_cache), *NODE_FLAGS]
        return ServerProcess(command, env={"XLSERVE_PROXY_API_KEY": ADMIN})

    def node_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.node_ports[index]}"

    def status(self) -> dict[str, dict]:
        answer = http.get(f"{self.proxy_url}/nodes/status", headers=auth(ADMIN), timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def client(self, url: str | None = None) -> openai.OpenAI:
        return openai_client(f"{url or self.proxy_url}/v1", USER, max_retries=0, timeout=120)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start_proxy(port: int, *flags: str) -> ServerProcess:
    return ServerProcess([console_script("xlserve"), "serve", "proxy", "--server-name", "127.0.0.1", "--server-port",
                          str(port), *flags])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("proxy")
    node_file = folder / "nodes.json"
    proxy_port = free_port()
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    proxies = [start_proxy(proxy_port, "--api-keys", USER, "--admin-api-keys", ADMIN, "--node-file", str(node_file),
                           "--health-check-interval", "0.5", "--request-timeout", "60")]
    cluster = Cluster(proxies[0], proxy_url, node_file, [], [free_port() for _ in range(3)], {}, folder / "jax-cache")
    try:
        for first, count in ((0, 1), (1, 3)):  # one, then two: three compiling at once on 2 cores start slowest
            cluster.nodes += [cluster.start_node(index) for index in range(first, count)]
            try:
                wait_for(lambda count=count: sum(node["healthy"] for node in cluster.status().values()) == count,
                         STARTUP_TIMEOUT_S, f"{count} nodes registered and in rotation")
            except AssertionError as error:
                outputs = "\n".join(process.output()[-2000:] for process in [*proxies, *cluster.nodes])
                raise AssertionError(f"{error}; their output:\n{outputs}") from None
        for strategy in STRATEGY_PROXIES:
            copy = folder / f"{strategy}.json"
            shutil.copy(node_file, copy)
            port = free_port()
            proxies.append(start_proxy(port, "--routing-strategy", strategy, "--node-file", str(copy),
                                       "--health-check-interval", "1", "--request-timeout", "60"))
            cluster.strategies[strategy] = f"http://127.0.0.1:{port}"
        for url in cluster.strategies.values():
            wait_for(lambda url=url: sum(n["healthy"] for n in http.get(f"{url}/nodes/status").json().values()) == 3,
                     60, f"the proxy at {url} finds the nodes of its node file")
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop(signal.SIGKILL)
        for proxy in proxies:
            assert proxy.stop(signal.SIGTERM) == 0, proxy.output()


@pytest.fixture(autouse=True)
def node_errors_shown(cluster: Cluster) -> Iterator[None]:
    """After each test, the end of the log of every node that logged an error: shown with a failing test
    (a node has failed under the whole suite's load, and its log is gone once the module ends)."""
    yield
    for index, node in enumerate(cluster.nodes):
        if " ERROR " in (output := node.output()):
            print(f"node {index} logged an error; its log ends:\n{output[-4000:]}")


# ---- what each node served, from its own /metrics --------------------------------------------------------


def node_metrics(url: str) -> dict[str, float]:
    """A node's samples by name, labels other than model_name in braces."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(http.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def served(cluster: Cluster) -> list[float]:
    """Choices each node has finished so far."""
    counts = []
    for index in range(3):
        samples = node_metrics(cluster.node_url(index))
        counts.append(sum(v for k, v in samples.items() if k.startswith("vllm:request_success_total")))
    return counts


def sent(cluster: Cluster, proxy_url: str) -> list[float]:
    """Requests a proxy says it sent each node (one scrape, where `served` takes three)."""
    counts = [0.0] * 3
    for family in text_string_to_metric_families(http.get(f"{proxy_url}/metrics", headers=auth(USER)).text):
        for sample in family.samples:
            if sample.name == "xlserve:proxy_node_requests_total":
                counts[cluster.node_ports.index(int(sample.labels["node"].rsplit(":", 1)[1]))] = sample.value
    return counts


def served_by(cluster: Cluster, proxy_url: str, send: Callable[[], object]) -> int:
    """Which node the proxy sent what `send` sends (nothing else may run meanwhile)."""
    before = sent(cluster, proxy_url)
    send()
    grew = [i for i, (a, b) in enumerate(zip(before, sent(cluster, proxy_url), strict=True)) if b > a]
    assert len(grew) == 1, grew
    return grew[0]


@contextlib.contextmanager
def same_counts(cluster: Cluster, proxy_url: str) -> Iterator[None]:
    """Check that what the proxy says it sent each node is what each node says it served."""
    proxy_before, nodes_before = sent(cluster, proxy_url), served(cluster)
    yield
    proxy_sent = [b - a for a, b in zip(proxy_before, sent(cluster, proxy_url), strict=True)]
    wait_for(lambda: [b - a for a, b in zip(nodes_before, served(cluster), strict=True)] == proxy_sent, 5,
             f"the nodes served what the proxy says it sent them ({proxy_sent})")


def spread(cluster: Cluster, run: Callable[[], None]) -> list[float]:
    before = served(cluster)
    run()
    return [after - was for was, after in zip(before, served(cluster), strict=True)]


def complete(url: str, prompt: str = "hello", **fields: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, **fields}
    return http.post(f"{url}/v1/completions", json=body, headers=auth(USER), timeout=120)


# ---- registration, models, keys ---------------------------------------------------------------------------


def test_nodes_register_themselves_and_the_proxy_serves_their_models(cluster: Cluster) -> None:
    status = cluster.status()
    assert sorted(status) == sorted(cluster.node_url(i) for i in range(3))
    for node in status.values():
        assert node["healthy"] and node["models"] == [MODEL] and node["role"] == "Hybrid"
        assert (node["block_size"], node["num_gpu_blocks"], node["enable_prefix_caching"]) == (16, NUM_PAGES - 1, True)
    for index in range(3):  # the gauge llm-d's scheduler reads, on each api_server
        samples = node_metrics(cluster.node_url(index))
        info = f"vllm:cache_config_info{{block_size=16,enable_prefix_caching=True,num_gpu_blocks={NUM_PAGES - 1}}}"
        assert samples[info] == 1
    assert set(json.loads(cluster.node_file.read_text())) == set(status), "the node file lists them"
    for index in range(3):
        assert "registered http://127.0.0.1" in cluster.nodes[index].output()
    client = cluster.client()
    assert [model.id for model in client.models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert missing.value.code == "model_not_found"


def test_user_keys_cannot_reach_the_node_routes(cluster: Cluster) -> None:
    url = cluster.proxy_url
    assert http.get(f"{url}/nodes/status").status_code == 401
    assert http.get(f"{url}/nodes/status", headers=auth(USER)).status_code == 403
    added = http.post(f"{url}/nodes/add", json={"url": "http://127.0.0.1:9"}, headers=auth(USER))
    assert added.status_code == 403 and added.json()["error"]["code"] == "admin_key_required"
    assert http.post(f"{url}/nodes/remove", json={"url": cluster.node_url(0)}, headers=auth(USER)).status_code == 403
    assert http.get(f"{url}/v1/models").status_code == 401
    assert http.get(f"{url}/v1/ready").status_code == 200 and http.get(f"{url}/health").status_code == 200
    assert complete(url).status_code == 200
    assert len(cluster.status()) == 3, "nothing was removed"


def test_streamed_text_equals_non_streamed_text_through_the_proxy(cluster: Cluster) -> None:
    client = cluster.client()
    messages = [{"role": "user", "content": "Tell me about the world"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    pieces = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces) == whole.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text.choices[0].text


def test_responses_messages_generate_encode_and_embeddings_are_relayed_as_a_node_answers_them(cluster: Cluster) -> None:
    """The proxy relays every generating route of api_server, not only the two chat APIs: through it, each
    answers as a node answers directly (greedy, so equal)."""
    node = cluster.node_url(0)
    proxied, direct = cluster.client(), cluster.client(node)
    ask = dict(model=MODEL, input="Tell me about the world", instructions="Be brief.", max_output_tokens=8,
               temperature=0)
    assert proxied.responses.create(**ask).output_text == direct.responses.create(**ask).output_text
    streamed = proxied.responses.create(**ask, stream=True)
    assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == \
        direct.responses.create(**ask).output_text

    def claude(url: str) -> anthropic.Anthropic:
        return anthropic_client(url, USER, max_retries=0, timeout=120)

    said = dict(model=MODEL, max_tokens=8, extra_body={"temperature": 0}, system="Be brief.",
                messages=[{"role": "user", "content": "Tell me about the world"}])
    assert claude(cluster.proxy_url).messages.create(**said).content[0].text == \
        claude(node).messages.create(**said).content[0].text

    for path, body in (("/generate", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
                       ("/generate", {"input_ids": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}),
                       ("/v1/encode", {"input": ["hello world", "bye"]})):
        through = http.post(f"{cluster.proxy_url}{path}", json=body, headers=auth(USER), timeout=120)
        own = http.post(f"{node}{path}", json=body, headers=auth(USER), timeout=120)
        assert through.status_code == own.status_code == 200, (path, through.text)
        keep = ("text", "output_ids") if path == "/generate" else ("input_ids", "length")
        assert {k: v for k, v in through.json().items() if k in keep} == \
            {k: v for k, v in own.json().items() if k in keep}, path
    vectors = [client.embeddings.create(model=MODEL, input=["hello world", "bye"]).data for client in
               (proxied, direct)]
    np.testing.assert_allclose(*([d.embedding for d in data] for data in vectors), atol=1e-6)
    missing = http.post(f"{cluster.proxy_url}/generate", json={"model": "nope", "prompt": "x"}, headers=auth(USER))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert http.post(f"{cluster.proxy_url}/v1/responses", json={"input": "x"}, headers=auth(USER)).status_code == 400


# ---- 60 requests per strategy, spread as the strategy says ------------------------------------------------


def test_random_spreads_sixty_requests_over_every_node(cluster: Cluster) -> None:
    url = cluster.strategies["random"]
    counts = spread(cluster, lambda: [complete(url).raise_for_status() for _ in range(60)])
    assert sum(counts) == 60 and min(counts) >= 5, counts


async def test_min_expected_latency_sends_each_request_to_the_node_with_fewest_in_flight(cluster: Cluster) -> None:
    """Three streams opened one after another, each once the one before has been answered (the proxy counts
    a request in flight from its routing on): each goes to a node with none in flight, so each node serves
    one; twice. Waiting for each stream's first token instead let the first stream end before the third
    was routed on a loaded CI machine (100 tokens; the nodes' sessions hold 128). (Sixty requests from six
    threads measured the nodes' speeds as much as the strategy: on a loaded 2-core CI machine one node
    served 11 to the others' 24 and 25, which is the strategy working.)"""
    url = cluster.strategies["min_expected_latency"]

    def idle() -> bool:  # by the proxy's own count, which the strategy reads (a stream ends there last)
        counts = [v for k, v in node_metrics(url).items() if k.startswith("xlserve:proxy_node_requests_in_flight")]
        return len(counts) == 3 and sum(counts) == 0

    async def three_staggered_streams() -> None:
        async with httpx.AsyncClient(timeout=60, headers=auth(USER)) as client, contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                response = await stack.enter_async_context(client.stream("POST", f"{url}/v1/completions", json=STREAM))
                assert response.status_code == 200  # in flight on its node
                stack.push_async_callback(consume, sse_lines(response))

    async def consume(lines: AsyncIterator[str]) -> None:
        async for _ in lines:
            pass

    before = served(cluster)
    for _ in range(2):
        wait_for(idle, 10, "the proxy has no request in flight")
        await three_staggered_streams()
    wait_for(lambda: sum(served(cluster)) - sum(before) == 6, 10, "six streams served")
    assert [b - a for a, b in zip(before, served(cluster), strict=True)] == [2, 2, 2]


def test_min_observed_latency_sends_each_request_to_the_fastest_node_so_far(cluster: Cluster) -> None:
    url = cluster.strategies["min_observed_latency"]
    with same_counts(cluster, url):
        for _ in range(60):
            nodes = http.get(f"{url}/nodes/status").json()
            means = {u: sum(n["latency"]) / len(n["latency"]) if n["latency"] else 0.0 for u, n in nodes.items()}
            fastest = {u for u, mean in means.items() if mean == min(means.values())}
            index = served_by(cluster, url, lambda: complete(url).raise_for_status())
            assert cluster.node_url(index) in fastest, (index, means)


def test_session_routing_keeps_each_session_on_one_node(cluster: Cluster) -> None:
    url = cluster.strategies["session"]
    homes: dict[str, set[int]] = {}
    keys = [f"conversation-{i}" for i in range(12)]
    with same_counts(cluster, url):
        for key in keys * 5:
            send = lambda key=key: http.post(  # noqa: E731
                f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                headers={"X-Session-ID": key}).raise_for_status()
            homes.setdefault(key, set()).add(served_by(cluster, url, send))
        for user in ("alice", "bob"):  # no header: OpenAI's `user` field is the key
            send = lambda user=user: complete(url, user=user).raise_for_status()  # noqa: E731
            assert len({served_by(cluster, url, send) for _ in range(3)}) == 1
    assert all(len(nodes) == 1 for nodes in homes.values()), homes
    assert len(set().union(*homes.values())) >= 2, "twelve sessions all on one node"


def test_interactive_sessions_stay_on_their_node(cluster: Cluster) -> None:
    url = f"{cluster.proxy_url}/v1/chat/interactive"
    for session_id in range(101, 107):
        history = 0
        for turn in range(3):
            # ignore_eos: the random demo model's greedy turn can end on its end-of-turn token (seen once in a
            # CI run, where the batch around it changed the last bits of its logits).
            body = {"prompt": f"turn {turn} of the story", "session_id": session_id, "interactive_mode": True,
                    "request_output_len": 3, "ignore_eos": True}
            answer = http.post(url, json=body, headers=auth(USER), timeout=60).json()
            assert answer["history_tokens"] == history, "each turn found the history its session left"
            history += answer["input_tokens"] + answer["tokens"]
        streamed = http.post(url, json={**body, "stream": True}, headers=auth(USER), timeout=60)
        lines = [json.loads(line) for line in streamed.text.splitlines()]
        assert lines[0]["history_tokens"] == history and lines[-1]["finish_reason"] == "length"
        ended = http.post(url, json={"prompt": "", "session_id": session_id, "interactive_mode": False,
                                      "request_output_len": 0}, headers=auth(USER), timeout=60)
        assert ended.status_code == 200
    wait_for(lambda: sum(node_metrics(cluster.node_url(i))["xlserve:interactive_sessions"] for i in range(3)) == 0,
             5, "every session ended on its node")


# ---- cache_aware ---------------------------------------------------------------------------------------


def system_prompt(group: int, seed: int) -> str:
    """96 tokens up to the user's turn (six full pages) in the demo model's chat template, whose first page
    already differs from every other group's (a shared first page would be a hit for any node)."""
    rng = random.Random(seed * 100 + group)
    return " ".join(rng.choice(MERGE_WORDS) for _ in range(83))


def cached_share(cluster: Cluster, url: str, seed: int) -> tuple[float, list[float]]:
    """Σ cached_tokens / Σ prompt_tokens over 8 groups of 12 chats sharing a long system prompt, arriving
    shuffled, sent to `url`; and how many each node served."""
    arrivals = [group for group in range(8) for _ in range(12)]
    random.Random(seed).shuffle(arrivals)
    client = cluster.client(url)
    usages = []

    def ask(item: tuple[int, int]) -> None:
        i, group = item
        messages = [{"role": "system", "content": system_prompt(group, seed)}, {"role": "user", "content": str(i)}]
        usages.append(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage)

    counts = spread(cluster, lambda: [ask(item) for item in enumerate(arrivals)])
    prompt = sum(usage.prompt_tokens for usage in usages)
    assert max(usage.prompt_tokens for usage in usages) < 7 * 16, "each request takes 7 pages, answer included"
    return sum(usage.prompt_tokens_details.cached_tokens for usage in usages) / prompt, counts


def test_cache_aware_reuses_prefixes_as_one_server_does_and_spreads_the_load(cluster: Cluster) -> None:
    single, _ = cached_share(cluster, cluster.node_url(0), seed=1)
    # random's share varies with its draws, from 19% to 43% in the runs seen: the mean of five
    # runs estimates what it reaches, so one lucky run cannot decide the comparison. cache_aware's varies
    # little (it keeps every group on one node: 82% each time).
    scattered = sum(cached_share(cluster, cluster.strategies["random"], seed=seed)[0] for seed in range(2, 7)) / 5
    aware, counts = cached_share(cluster, cluster.proxy_url, seed=7)
    print(f"cached share: one server {single:.3f}, random {scattered:.3f}, cache_aware {aware:.3f}; "
          f"cache_aware's requests per node {counts}")
    assert aware >= 2 * scattered and aware >= 0.8 * single, (single, scattered, aware)
    assert max(counts) <= 2 * min(counts), counts
    metrics = http.get(f"{cluster.proxy_url}/metrics", headers=auth(USER)).text
    assert 'xlserve:proxy_routing_decisions_total{branch="cache_hit",strategy="cache_aware"}' in metrics


# ---- errors ------------------------------------------------------------------------------------------------


def test_upstream_400s_pass_through_unchanged_and_never_count_against_the_node(cluster: Cluster) -> None:
    url = cluster.strategies["random"]
    bad = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": -1}
    direct = http.post(f"{cluster.node_url(0)}/v1/completions", json=bad)
    assert direct.status_code == 400
    for _ in range(20):
        answer = http.post(f"{url}/v1/completions", json=bad)
        assert (answer.status_code, answer.json()) == (400, direct.json())
        assert answer.headers["content-type"] == direct.headers["content-type"]
    status = http.get(f"{url}/nodes/status").json()
    assert all(node["healthy"] and node["failures"] == 0 for node in status.values())
    assert "xlserve:proxy_node_failures_total{" not in http.get(f"{url}/metrics").text
    counts = spread(cluster, lambda: [complete(url).raise_for_status() for _ in range(30)])
    assert min(counts) >= 1, "every node is still in rotation"


async def test_a_client_that_disconnects_mid_stream_stops_the_generation_on_its_node(cluster: Cluster) -> None:
    def total(name: str) -> float:
        return sum(node_metrics(cluster.node_url(i)).get(name, 0.0) for i in range(3))

    wait_for(lambda: total("vllm:num_requests_running") == 0, 10, "the nodes are idle")
    aborted = total("vllm:request_success_total{finished_reason=abort}")
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{cluster.proxy_url}/v1/completions", json=STREAM,
                                 headers=auth(USER)) as response:
            assert (await anext(sse_lines(response))).startswith("data: ")  # generating; then the client leaves
    hung_up = time.monotonic()
    wait_for(lambda: total("vllm:num_requests_running") == 0, 1.0, "the node stopped the stream its client left")
    print(f"running back to 0 {time.monotonic() - hung_up:.2f}s after the disconnect")
    wait_for(lambda: total("vllm:request_success_total{finished_reason=abort}") == aborted + 1, 5,
             "the node counted the stream as aborted, not run to its end")


# ---- faults (kill nodes: last) --------------------------------------------------------------------------


def test_a_node_killed_during_thirty_requests_costs_no_client_an_error_and_comes_back(cluster: Cluster) -> None:
    victim = 2
    done = threading.Semaphore(0)

    def ask(_: int) -> httpx.Response:
        answer = complete(cluster.proxy_url, prompt="Tell me", max_tokens=100, ignore_eos=True)
        done.release()
        return answer

    with ThreadPoolExecutor(6) as pool:
        answers = pool.map(ask, range(30))
        for _ in range(3):
            assert done.acquire(timeout=120)
        wait_for(lambda: cluster.status()[cluster.node_url(victim)]["unfinished"] > 0, 60,
                 "requests in flight on the node about to be killed")
        cluster.nodes[victim].process.kill()
        cluster.nodes[victim].process.wait()
        answers = list(answers)
    assert [answer.status_code for answer in answers] == [200] * 30, [a.text for a in answers if a.status_code != 200]
    assert all(answer.json()["usage"]["completion_tokens"] == 100 for answer in answers)
    wait_for(lambda: not cluster.status()[cluster.node_url(victim)]["healthy"], 5, "the killed node is dropped")
    metrics = {family.name: family for family in text_string_to_metric_families(
        http.get(f"{cluster.proxy_url}/metrics", headers=auth(USER)).text)}
    retries = {sample.labels["reason"]: sample.value for sample in metrics["xlserve:proxy_retries"].samples
               if sample.name.endswith("_total")}
    assert retries.get("connect", 0) >= 1, f"the requests in flight on the killed node were retried: {retries}"

    cluster.nodes[victim].stop(signal.SIGKILL)
    cluster.nodes[victim] = cluster.start_node(victim)
    wait_for(lambda: cluster.status()[cluster.node_url(victim)]["healthy"], STARTUP_TIMEOUT_S,
             "the restarted node is back in rotation")
    # Prompts shorter than a page go to the least loaded node, ties at random: 36 of them miss the
    # restarted node with probability (2/3)**36, about 5e-7 (12 missed it once in a CI run, 0.8%).
    counts = spread(cluster, lambda: [complete(cluster.proxy_url, prompt=f"p{i}").raise_for_status()
                                      for i in range(36)])
    assert counts[victim] >= 1, counts


async def test_a_node_killed_mid_stream_ends_its_streams_with_an_error_event(cluster: Cluster) -> None:
    """Six streams, two a node; node 2 runs at a tenth of its speed (stopped 45 ms of every 50), so its two
    are still streaming when the others' four have ended, and then it is killed: exactly its two end with
    an error event, at once. (Killing a node once all six had started found it done with its streams in
    CI: the tiny model's 100 tokens take a fraction of a second, and the proxy still counted them in
    flight while it relayed their last bytes.)"""
    url = cluster.strategies["min_expected_latency"]
    wait_for(lambda: all(n["healthy"] for n in http.get(f"{url}/nodes/status").json().values()), 30,
             "the proxy has every node in rotation")
    victim = cluster.nodes[2].process
    throttled = threading.Event()

    def throttle() -> None:
        while not throttled.is_set():
            victim.send_signal(signal.SIGSTOP)
            time.sleep(0.045)
            victim.send_signal(signal.SIGCONT)
            time.sleep(0.005)

    open_streams: dict[int, int] = {}  # stream -> lines received, while it streams
    killed_at: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def stream(index: int) -> tuple[list[str], float]:
            async with client.stream("POST", f"{url}/v1/completions", json=STREAM) as response:
                assert response.status_code == 200
                received = []
                open_streams[index] = 0
                async for line in sse_lines(response):
                    received.append(line)
                    open_streams[index] += 1
                del open_streams[index]
                return received, time.monotonic()

        thread = threading.Thread(target=throttle, daemon=True)
        thread.start()
        try:
            streams = [asyncio.create_task(stream(i)) for i in range(6)]
            deadline = time.monotonic() + 60
            # The four on the full-speed nodes ended, the victim's two under way.
            while not (len(open_streams) == 2 and all(open_streams.values()) and sum(s.done() for s in streams) == 4):
                assert time.monotonic() < deadline, f"streams open (lines received): {open_streams}"
                await asyncio.sleep(0.01)
            victim.kill()
            killed_at.append(time.monotonic())
        finally:
            throttled.set()
            thread.join()
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
    failed = 0
    for lines, ended in results:
        payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]", "every stream ends, none hangs"
        last = json.loads(payloads[-2])
        if "error" in last:
            failed += 1
            # A surviving node failing a request is a bug of its own: show what it said and logged.
            assert last["error"]["code"] == "upstream_failed", (
                last["error"], "\n".join(node.output()[-3000:] for node in cluster.nodes[:2]))  # the survivors
            assert ended - killed_at[0] < 5, "the error came at once, well within the request timeout"
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert failed == 2, f"{failed} of 6 streams ended with an error; the victim's two were under way"
