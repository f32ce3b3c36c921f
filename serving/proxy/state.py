"""Everything the proxy's routes share: its settings, nodes, routing strategy, metrics, the one pooled
HTTP client to its nodes, the health checks, and which node holds each interactive session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx
from quart import current_app

from serving.proxy.forward import Relay
from serving.proxy.metrics import ProxyMetrics
from serving.proxy.nodes import Node, NodeRegistry
from serving.proxy.probe import PROBE_TIMEOUT_S, HealthChecker
from serving.proxy.routing import Strategy, make_strategy
from serving.proxy.settings import ProxySettings

logger = logging.getLogger(__name__)

KEEPALIVE_EXPIRY_S = 2.0
MAX_SESSIONS = 65536  # interactive sessions remembered (each api_server keeps at most 1024)


@dataclass
class ProxyState:
    settings: ProxySettings
    registry: NodeRegistry = field(init=False)
    strategy: Strategy = field(init=False)
    metrics: ProxyMetrics = field(init=False)
    client: httpx.AsyncClient = field(init=False)
    relay: Relay = field(init=False)
    sessions: OrderedDict[int, str] = field(init=False, default_factory=OrderedDict)  # session id -> node URL
    _health: asyncio.Task | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.registry = NodeRegistry(self.settings.node_file)
        self.registry.restore()  # here, so a node file that cannot be read stops the proxy before it serves
        self.strategy = make_strategy(self.settings.routing_strategy)
        self.metrics = ProxyMetrics(self.registry)

    @property
    def node_headers(self) -> dict[str, str]:
        """What the proxy's own calls to a node carry (its probes; requests carry the client's headers)."""
        key = self.settings.node_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def start(self) -> None:
        # One pool for every node: connections are reused across requests (LMDeploy opened a session per
        # request). No read timeout: a long prompt may take minutes to its first token; --request-timeout
        # bounds a request as a whole. Idle connections are dropped well before the nodes' servers drop
        # them (Hypercorn and uvicorn after 5 s), so a request never goes out on one just being closed,
        # which would look like a dead node.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=PROBE_TIMEOUT_S),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=512,
                                keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )
        self.relay = Relay(self.registry, self.strategy, self.client, self.metrics, self.settings.request_timeout)
        checker = HealthChecker(self.registry, self.client, self.node_headers, self.settings.health_check_interval,
                                on_back=self.forget)
        self._health = asyncio.get_running_loop().create_task(checker.run())

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        await self.client.aclose()

    def forget(self, node: Node) -> None:
        """A node left, or came back (perhaps restarted): what routing remembered of it is stale."""
        self.strategy.forget(node.url)

    # ----- interactive sessions -----------------------------------------------------------------------
    def session_node(self, session_id: int) -> Node | None:
        url = self.sessions.get(session_id)
        return None if url is None else self.registry.get(url)

    def pin_session(self, session_id: int, node: Node) -> None:
        self.sessions[session_id] = node.url
        self.sessions.move_to_end(session_id)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)

    def end_session(self, session_id: int) -> None:
        self.sessions.pop(session_id, None)


def proxy_state() -> ProxyState:
    return current_app.extensions["xlserve_proxy"]
