"""One HTTP request from arrival to the last byte sent (or the client gone): its id, its deadline, its
admission ticket, and the access-log line written when it ends.

`ExchangeMiddleware` wraps the Quart app at the ASGI level because that is the only place that sees
every way a request can end: answered, streamed to `[DONE]`, refused, or cancelled by a client that
hung up before or during its stream. Its `finally` therefore releases the request's admission slots
even when Quart never started the response body (a streaming handler's own clean-up would not run
then). It also gives each request an id (the client's `X-Request-Id` if it is a plain token, else a
fresh one), echoed in the response header and in every log line about the request, and keeps the set
of requests in flight (`ServerState.enter`/`leave`), which a graceful shutdown waits on.

Handlers and the engine bridge find their exchange with `current_exchange()`: the middleware sets a
context variable, which the handler's task (and its streamed body) inherit.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.http.admission import Admission, Ticket
from serving.http.errors import APIError

if TYPE_CHECKING:
    from serving.http.metrics import ServerMetrics
    from serving.http.state import ServerState

access_logger = logging.getLogger("xlserve.access")

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

# A client's own id is kept only if it cannot forge log structure or bloat every line.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_current: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("xlserve_exchange", default=None)


def current_exchange() -> Exchange | None:
    """The HTTP request being served by this task (None outside a request, e.g. the offline pipeline)."""
    return _current.get()


@dataclass(eq=False)
class Exchange:
    request_id: str
    method: str
    path: str
    client: str
    started: float  # event-loop time of arrival
    deadline: float | None  # event-loop time by which generation must end (--request-timeout)
    admission: Admission
    metrics: ServerMetrics
    ticket: Ticket | None = None
    status: int | None = None
    bytes_sent: int = 0
    completed: bool = False  # the last byte went out; False at the end means the client hung up
    # Filled in by the engine bridge, for the access log.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    def admit(self, slots: int) -> None:
        """Reserve `slots` admission slots for this request (400 if it could never run, 503 if the
        server is full); counted in the metrics when refused."""
        try:
            self.ticket = self.admission.reserve(slots)
        except APIError as error:
            if error.status == 503:
                self.metrics.reject(error.code or "server_overloaded")
            raise

    def close(self) -> None:
        if self.ticket is not None:
            self.ticket.release()


class ExchangeMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        timeout = state.settings.request_timeout
        now = asyncio.get_running_loop().time()
        exchange = Exchange(
            request_id=_request_id(scope),
            method=scope["method"],
            path=scope["path"],
            client=(scope.get("client") or ("-",))[0],
            started=now,
            deadline=None if timeout is None else now + timeout,
            admission=state.admission,
            metrics=state.metrics,
        )
        header = (b"x-request-id", exchange.request_id.encode())

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), header]}
            elif message["type"] == "http.response.body":
                exchange.bytes_sent += len(message.get("body", b""))
                exchange.completed = not message.get("more_body", False)
            await send(message)

        token = _current.set(exchange)
        state.enter(exchange)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            _current.reset(token)
            exchange.close()
            state.leave(exchange)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(_access_line(exchange, asyncio.get_running_loop().time()))


def _request_id(scope: dict) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _access_line(exchange: Exchange, now: float) -> str:
    """One JSON object per request, so log pipelines can parse it without a custom grammar."""
    record: dict[str, Any] = {
        "request_id": exchange.request_id,
        "method": exchange.method,
        "path": exchange.path,
        "status": exchange.status,
        "duration_ms": round((now - exchange.started) * 1000, 1),
        "bytes_sent": exchange.bytes_sent,
        "client": exchange.client,
        "client_disconnected": not exchange.completed,
    }
    if exchange.finish_reasons:
        record["prompt_tokens"] = exchange.prompt_tokens
        record["completion_tokens"] = exchange.completion_tokens
        record["finish_reasons"] = exchange.finish_reasons
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
