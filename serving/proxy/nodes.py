"""The proxy's nodes: what each serves, how loaded and how healthy it is, and the file that lists them.

A node is an api_server (ours or LMDeploy's) at a base URL. It enters the registry through POST
/nodes/add (an api_server started with `--proxy-url` calls it once it is ready) or the node file, and
leaves through POST /nodes/remove. A node that stops answering stays registered but out of rotation
(`healthy` false) until the health checks see it ready again, so a restarted server needs no one to
add it back.

The node file (`--node-file`) is read at start and rewritten on every add and remove, so a restarted
proxy knows its nodes before they register again. It is LMDeploy's `proxy_config.json` shape, `{url:
status}`, whose status LMDeploy wrote as a JSON string (read too); it lives wherever the operator
says, never inside the installed package.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

LATENCY_WINDOW = 15  # LMDeploy's: min_observed_latency averages a node's last 15 request latencies
HYBRID = "Hybrid"  # LMDeploy's role of a node that both prefills and decodes (the only one served here)


def normalize_url(url: str) -> str:
    """`http://Host:8000/` as `http://host:8000`; ValueError for anything but an http(s) base URL."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"a node URL must look like http://host:port, got {url!r}")
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as error:
        raise ValueError(f"a node URL must look like http://host:port, got {url!r}") from error
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class NodeFacts:
    """What a probe of a node found (`probe.probe_node`)."""

    models: list[dict[str, Any]]  # the model cards of its /v1/models
    ready: bool  # its /v1/ready answered 200
    page_size: int | None = None  # from its vllm:cache_config_info, when it exports one
    num_pages: int | None = None
    prefix_caching: bool | None = None


@dataclass(eq=False)
class Node:
    url: str
    models: list[dict[str, Any]] = field(default_factory=list)  # the model cards of its /v1/models
    role: str = HYBRID
    speed: float | None = None  # LMDeploy's relative speed (weights `random`, divides `min_expected_latency`)
    healthy: bool = False  # in rotation: its /v1/ready answered 200 and it has not failed since
    in_flight: int = 0  # requests relayed to it and not finished
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    failures: int = 0  # server errors in a row
    page_size: int | None = None  # KV page size in tokens, as its vllm:cache_config_info says
    num_pages: int | None = None
    prefix_caching: bool | None = None

    def learn(self, facts: NodeFacts) -> None:
        """Take what a probe found; a ready node (back) in rotation starts with a clean record."""
        self.models = facts.models
        self.page_size, self.num_pages, self.prefix_caching = facts.page_size, facts.num_pages, facts.prefix_caching
        self.healthy = facts.ready
        self.failures = 0

    @property
    def model_names(self) -> list[str]:
        return [card["id"] for card in self.models]

    @property
    def mean_latency(self) -> float:
        """Mean of the recent latencies; 0 before the first, so a new node is tried first."""
        return statistics.fmean(self.latencies) if self.latencies else 0.0

    def serves(self, model: str | None) -> bool:
        """Whether it serves `model` (None: a request that names no model, which any node may take)."""
        return model is None or model in self.model_names

    def status(self) -> dict[str, Any]:
        """Its entry in GET /nodes/status: LMDeploy's fields, then ours."""
        return {
            "role": self.role,
            "models": self.model_names,
            "unfinished": self.in_flight,
            "latency": list(self.latencies),
            "speed": self.speed,
            "healthy": self.healthy,
            "failures": self.failures,
            "block_size": self.page_size,
            "num_gpu_blocks": self.num_pages,
            "enable_prefix_caching": self.prefix_caching,
        }


class NodeRegistry:
    def __init__(self, node_file: str | None = None):
        self.node_file = node_file
        self.nodes: dict[str, Node] = {}

    def __iter__(self):
        return iter(list(self.nodes.values()))

    def get(self, url: str) -> Node | None:
        return self.nodes.get(url)

    def add(self, url: str, facts: NodeFacts, role: str = HYBRID, speed: float | None = None) -> Node:
        """Register the node at `url`, or update it: the same object, whose requests in flight still
        count against it."""
        node = self.nodes.setdefault(url, Node(url))
        node.role, node.speed = role, speed
        node.learn(facts)
        self.save()
        return node

    def remove(self, url: str) -> Node | None:
        node = self.nodes.pop(url, None)
        if node is not None:
            self.save()
        return node

    def candidates(self, model: str | None) -> list[Node]:
        """The nodes in rotation that serve `model`."""
        return [node for node in self.nodes.values() if node.healthy and node.serves(model)]

    def knows(self, model: str) -> bool:
        """Whether any registered node, healthy or not, serves `model`."""
        return any(model in node.model_names for node in self.nodes.values())

    def model_cards(self) -> list[dict[str, Any]]:
        """Every model some registered node serves, once (the first node's card)."""
        cards: dict[str, dict[str, Any]] = {}
        for node in self.nodes.values():
            for card in node.models:
                cards.setdefault(card["id"], card)
        return list(cards.values())

    # ----- the node file ------------------------------------------------------------------------------
    def restore(self) -> None:
        """Register the nodes the node file lists, out of rotation until a health check finds them ready;
        ValueError if the file is not a node file."""
        if self.node_file is None or not os.path.exists(self.node_file):
            return
        try:
            with open(self.node_file, encoding="utf-8") as file:
                text = file.read()
            entries = json.loads(text) if text.strip() else {}
            if not isinstance(entries, dict):
                raise ValueError("it must hold a JSON object of url: status")
            # LMDeploy's proxy_config.json holds each status as JSON text
            entries = {url: json.loads(status) if isinstance(status, str) else status
                       for url, status in entries.items()}
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the node file {self.node_file}: {error}") from error
        for url, status in entries.items():
            status = status if isinstance(status, dict) else {}
            models = [{"id": name, "object": "model"} for name in status.get("models") or ()]
            node = Node(normalize_url(url), models=models, role=status.get("role") or HYBRID, speed=status.get("speed"))
            self.nodes[node.url] = node

    def save(self) -> None:
        """Rewrite the node file (atomically: a reader never sees half a file)."""
        if self.node_file is None:
            return
        entries = {
            url: {"models": node.model_names, "role": node.role, "speed": node.speed}
            for url, node in self.nodes.items()
        }
        directory = os.path.dirname(os.path.abspath(self.node_file))
        try:
            with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, encoding="utf-8") as file:
                json.dump(entries, file, indent=2)
            try:
                os.replace(file.name, self.node_file)
            except OSError:
                os.unlink(file.name)
                raise
        except OSError as error:  # the registry in memory stays right; say why the file is stale
            logger.error("cannot write the node file %s: %s", self.node_file, error)
