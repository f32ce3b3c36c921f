"""Relaying a request to a node and its answer back: whole answers, and streams as their chunks arrive.

Errors keep their meaning (LMDeploy's proxy turned every failure into a 200 carrying `error_code` 10402):
- a node's 4xx goes back unchanged (status, body, content type) and never counts against the node
  (SGLang's circuit breaker once took a fleet down by counting context-length 400s as faults);
- a lost connection, or a 5xx, before any byte reached the client is retried once on another node; it
  counts against the node: a lost connection takes it out of rotation at once, `FAILURES_TO_DROP`
  server errors in a row too (a 503 says the node is busy or draining, and counts not at all);
- a stream whose node fails midway ends with an error event (then `[DONE]`; an error line in NDJSON),
  never a hang; past `--request-timeout` with a 504 or that error event;
- no node to send to: 503 with Retry-After; no node answered: 502.
A client that hangs up cancels its handler, which closes the upstream request (never returned to the
connection pool half-read), so the node sees the disconnect and aborts the generation. A stream the
client left before Quart even began to send it is released by `ReleaseMiddleware`, which wraps the
whole exchange (the stream's own clean-up would never run then).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import httpx
from quart import Response

from serving.http.errors import RETRY_AFTER_S, APIError
from serving.http.exchange import ASGIApp
from serving.http.sse import DONE, event, ndjson_line
from serving.proxy.metrics import ProxyMetrics
from serving.proxy.nodes import Node, NodeRegistry
from serving.proxy.routing import RoutedRequest, Strategy

logger = logging.getLogger(__name__)

FAILURES_TO_DROP = 3
ATTEMPTS = 2  # the first node, then one other
# Request headers a node needs; hop-by-hop ones (Connection, Host, Content-Length) are the client's own.
FORWARDED_HEADERS = ("content-type", "accept", "authorization", "x-api-key", "x-request-id", "user-agent")
RETURNED_HEADERS = ("content-type", "x-request-id", "retry-after", "www-authenticate")
STREAM_TYPES = {"text/event-stream": b"\n\n", "application/x-ndjson": b"\n"}  # media type -> frame end

# What the exchange being served holds open (streams relayed to a node), released when it ends.
_held: contextvars.ContextVar[list[_Held] | None] = contextvars.ContextVar("xlserve_proxy_held", default=None)


class ReleaseMiddleware:
    """Wraps the app at the ASGI level, the one place that sees every way an exchange ends, so a stream
    is released (its node's count, its upstream connection) however the client went."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        held: list[_Held] = []
        token = _held.set(held)
        try:
            await self.app(scope, receive, send)
        finally:
            _held.reset(token)
            for hold in held:
                await hold.release()


class _Held:
    """A relayed stream's hold on its node (one request in flight) and on its upstream connection."""

    def __init__(self, node: Node, upstream: httpx.Response):
        self.node = node
        self.upstream = upstream
        self.released = False
        held = _held.get()
        if held is not None:
            held.append(self)

    async def release(self) -> None:
        if not self.released:
            self.released = True
            self.node.in_flight -= 1
            await self.upstream.aclose()


@dataclass
class Failure:
    """Why an attempt gave no answer to relay: an error response of the node's own, or a lost connection."""

    reason: str  # for the retry counter: connect, timeout, server_error, overloaded
    answer: Response | None = None  # a 5xx the node sent; relayed as it is if no other node does better
    message: str = ""


def upstream_headers(incoming: Mapping[str, str], node_api_key: str | None, client: str | None) -> dict[str, str]:
    headers = {name: incoming[name] for name in FORWARDED_HEADERS if name in incoming}
    if node_api_key is not None:  # the proxy checked the client's key; nodes know only the proxy's
        headers.pop("x-api-key", None)
        headers["authorization"] = f"Bearer {node_api_key}"
    headers["accept-encoding"] = "identity"  # bytes are relayed as they come: a compressed body would not be
    if client:
        previous = incoming.get("x-forwarded-for")
        headers["x-forwarded-for"] = f"{previous}, {client}" if previous else client
    return headers


class Relay:
    def __init__(self, registry: NodeRegistry, strategy: Strategy, client: httpx.AsyncClient,
                 metrics: ProxyMetrics, request_timeout: float | None):
        self.registry = registry
        self.strategy = strategy
        self.client = client
        self.metrics = metrics
        self.request_timeout = request_timeout

    async def send(
        self, path: str, body: bytes, headers: Mapping[str, str], routed: RoutedRequest, first: Node | None = None
    ) -> tuple[Response, Node | None]:
        """The answer to relay, and the node that gave it (None when the proxy answers itself). `first`:
        a node to try before any other (the one holding an interactive session), if it is in rotation."""
        loop = asyncio.get_running_loop()
        deadline = None if self.request_timeout is None else loop.time() + self.request_timeout
        tried: list[Node] = []
        failure: Failure | None = None
        for attempt in range(ATTEMPTS):
            nodes = [node for node in self.registry.candidates(routed.model) if node not in tried]
            if not nodes:
                break
            if attempt == 0 and first is not None and first in nodes:
                node = first
                self.metrics.requests.labels(node.url).inc()
            else:
                choice = self.strategy.choose(nodes, routed)
                self.metrics.routed(choice)
                node = choice.node
            if failure is not None:
                self.metrics.retries.labels(failure.reason).inc()
            tried.append(node)
            outcome = await self._attempt(node, path, body, headers, deadline)
            if isinstance(outcome, Response):
                return outcome, node
            failure = outcome
            if failure.reason == "timeout":
                break  # the request's own time is up: no time for another node
        return self._give_up(failure), None

    def _give_up(self, failure: Failure | None) -> Response:
        if failure is None:
            self.metrics.errors.labels("no_healthy_node").inc()
            return APIError(503, "no healthy node serves this model right now; retry shortly",
                            code="no_healthy_node", headers={"Retry-After": str(RETRY_AFTER_S)}).response()
        if failure.answer is not None:
            return failure.answer
        code, status = ("upstream_timeout", 504) if failure.reason == "timeout" else ("upstream_unavailable", 502)
        self.metrics.errors.labels(code).inc()
        return APIError(status, failure.message, code=code).response()

    async def _attempt(
        self, node: Node, path: str, body: bytes, headers: Mapping[str, str], deadline: float | None
    ) -> Response | Failure:
        node.in_flight += 1
        started = time.monotonic()
        streaming = False
        upstream: httpx.Response | None = None
        try:
            async with asyncio.timeout_at(deadline):
                request = self.client.build_request("POST", f"{node.url}{path}", content=body, headers=headers)
                upstream = await self.client.send(request, stream=True)
                media_type = upstream.headers.get("content-type", "").split(";")[0].strip()
                if upstream.status_code >= 500:
                    return self._server_error(node, upstream.status_code, await upstream.aread(), upstream.headers)
                node.failures = 0
                if upstream.status_code == 200 and media_type in STREAM_TYPES:
                    streaming = True
                    return self._streamed(node, upstream, STREAM_TYPES[media_type], started, deadline)
                answer = await upstream.aread()
            node.latencies.append(time.monotonic() - started)
            return _response(answer, upstream.status_code, upstream.headers)
        except TimeoutError:
            self.metrics.failures.labels(node.url, "timeout").inc()
            return Failure("timeout", message="no node answered within the request timeout")
        except httpx.HTTPError as error:
            self._lost(node, "connect", error)
            return Failure("connect", message=f"the node failed: {type(error).__name__}: {error}")
        finally:
            if not streaming:
                node.in_flight -= 1
                if upstream is not None:
                    await upstream.aclose()

    def _server_error(self, node: Node, status: int, body: bytes, headers: httpx.Headers) -> Failure:
        if status == 503:
            return Failure("overloaded", _response(body, status, headers))
        self.metrics.failures.labels(node.url, "server_error").inc()
        node.failures += 1
        if node.failures >= FAILURES_TO_DROP and node.healthy:
            node.healthy = False
            logger.warning("node %s answered %d server errors in a row: out of rotation", node.url, node.failures)
        return Failure("server_error", _response(body, status, headers))

    def _lost(self, node: Node, kind: str, error: Exception) -> None:
        self.metrics.failures.labels(node.url, kind).inc()
        if node.healthy:
            node.healthy = False
            logger.warning("lost node %s (%s: %s): out of rotation", node.url, type(error).__name__, error)

    def _streamed(self, node: Node, upstream: httpx.Response, frame_end: bytes, started: float,
                  deadline: float | None) -> Response:
        sse = frame_end == b"\n\n"
        hold = _Held(node, upstream)

        def error_frame(status: int, message: str, code: str) -> bytes:
            body = APIError(status, message, code=code).body()
            return event(body) + DONE if sse else ndjson_line(body)

        async def frames() -> AsyncIterator[bytes]:
            pending = b""
            done = False
            try:
                chunks = upstream.aiter_raw()
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    pending += chunk
                    end = pending.rfind(frame_end)
                    if end >= 0:  # relay whole events only, so an error event never lands inside one
                        end += len(frame_end)
                        complete, pending = pending[:end], pending[end:]
                        done = done or complete.endswith(DONE)
                        yield complete
                node.latencies.append(time.monotonic() - started)
                if pending:
                    yield pending
            except TimeoutError:
                self.metrics.failures.labels(node.url, "timeout").inc()
                yield error_frame(504, "the request timeout passed while the node was streaming", "upstream_timeout")
            except httpx.HTTPError as error:
                self._lost(node, "stream", error)
                if not done:
                    yield error_frame(502, f"the node serving this stream failed: {type(error).__name__}",
                                      "upstream_failed")
            finally:
                await hold.release()

        response = _response(frames(), upstream.status_code, upstream.headers)
        # no-transform/X-Accel-Buffering: a proxy in front of this one must not buffer the tokens either.
        response.headers["Cache-Control"] = "no-cache, no-transform"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None  # Quart's response timeout would cut a long generation off
        return response


def _response(body: bytes | AsyncIterator[bytes], status: int, headers: httpx.Headers) -> Response:
    response = Response(body, status=status)
    for name in RETURNED_HEADERS:
        if name in headers:
            response.headers[name] = headers[name]
    return response
