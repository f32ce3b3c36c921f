"""What a node serves and whether it can serve now: the probe a node passes before it is accepted, and
the health checks that take a node out of rotation and put it back.

A node is accepted only once its /v1/models lists what it serves (LMDeploy took the registering
server's word for it). It enters rotation only when its /v1/ready answers 200, so a server still
compiling is registered but gets no traffic. Its `vllm:cache_config_info` (page size, pages, prefix
caching) is read from /metrics when the node exports it and lets the proxy see it.

Health checks run every `--health-check-interval` seconds, on all nodes at once, each bounded by a
timeout (LMDeploy's checked one node after another, with none): a node whose /v1/ready fails is
dropped from rotation; one that answers 200 again is probed afresh (it may have restarted with other
flags) and put back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serving.proxy.nodes import Node, NodeFacts, NodeRegistry

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


class ProbeError(Exception):
    """The node cannot be accepted; the message says why."""


async def probe_node(client: httpx.AsyncClient, url: str, headers: Mapping[str, str]) -> NodeFacts:
    try:
        listed = await client.get(f"{url}/v1/models", headers=headers, timeout=PROBE_TIMEOUT_S)
        if listed.status_code != 200:
            raise ProbeError(f"GET {url}/v1/models answered {listed.status_code}: {listed.text[:200]}")
        models = _model_cards(listed)
        ready = (await client.get(f"{url}/v1/ready", timeout=PROBE_TIMEOUT_S)).status_code == 200
        metrics = await client.get(f"{url}/metrics", headers=headers, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as error:
        raise ProbeError(f"cannot reach {url}: {type(error).__name__}: {error}") from None
    page_size, num_pages, prefix_caching = cache_config(metrics.text) if metrics.status_code == 200 else (None,) * 3
    return NodeFacts(models, ready, page_size, num_pages, prefix_caching)


def _model_cards(response: httpx.Response) -> list[dict]:
    try:
        cards = response.json()["data"]
        if isinstance(cards, list) and cards and all(isinstance(c, dict) and isinstance(c.get("id"), str)
                                                     for c in cards):
            return cards
    except (ValueError, KeyError, TypeError):
        pass
    raise ProbeError(f"{response.request.url} does not list models as OpenAI's /v1/models does")


def cache_config(metrics_text: str) -> tuple[int | None, int | None, bool | None]:
    """Page size, page count and prefix caching from `vllm:cache_config_info` (vLLM's label values are
    strings); Nones where the node does not export it."""
    try:
        for family in text_string_to_metric_families(metrics_text):
            if family.name == "vllm:cache_config_info" and family.samples:
                labels = family.samples[0].labels
                caching = labels.get("enable_prefix_caching")
                return (
                    _integer(labels.get("block_size")),
                    _integer(labels.get("num_gpu_blocks")),
                    None if caching is None else caching.lower() == "true",
                )
    except ValueError:  # not Prometheus text: a node that is not an api_server we know
        pass
    return None, None, None


def _integer(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() and int(text) > 0 else None


class HealthChecker:
    def __init__(
        self,
        registry: NodeRegistry,
        client: httpx.AsyncClient,
        headers: Mapping[str, str],
        interval: float,
        on_back: Callable[[Node], None],
    ):
        self.registry = registry
        self.client = client
        self.headers = headers
        self.interval = interval
        self.on_back = on_back  # a node back in rotation: it may have restarted, with an empty cache

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(node) for node in self.registry))

    async def check(self, node: Node) -> None:
        try:
            ready = (await self.client.get(f"{node.url}/v1/ready", timeout=PROBE_TIMEOUT_S)).status_code == 200
        except httpx.HTTPError:
            ready = False
        if node.healthy and not ready:
            node.healthy = False
            logger.warning("node %s failed its health check: out of rotation", node.url)
        elif not node.healthy and ready:
            try:
                facts = await probe_node(self.client, node.url, self.headers)
            except ProbeError as error:
                logger.warning("node %s is ready but cannot be probed: %s", node.url, error)
                return
            if self.registry.get(node.url) is node and facts.ready:  # not removed meanwhile
                node.learn(facts)
                self.on_back(node)
                logger.warning("node %s is ready: back in rotation", node.url)
