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

The middleware also watches the request body arrive. An answer that starts before the whole body was
read (a 401, 405 or 413, or a refusal while the body still trickles in) says `Connection: close`: the
unread rest would otherwise be taken for the next request on a kept-alive connection, or the server
would close the connection under a client that had already sent its next request on it. And a body
still being read when a graceful shutdown begins is not waited for (`Exchange.refuse_body`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.http.admission import Admission, Ticket
from serving.http.errors import APIError, server_shutting_down

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
    first_token_deadline: float | None  # event-loop time by which a first token must come (--first-token-timeout)
    admission: Admission
    metrics: ServerMetrics
    ticket: Ticket | None = None
    status: int | None = None
    bytes_sent: int = 0
    completed: bool = False  # the last byte went out; False at the end means the client hung up
    body_received: bool = True  # the whole request body has reached the app (False while one is on its way)
    # Filled in by the engine bridge, for the access log.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    _body_refused: bool = False
    _body_scope: asyncio.Timeout | None = None

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

    @contextlib.asynccontextmanager
    async def reading_body(self) -> AsyncIterator[None]:
        """Around reading the request body: raises 503 `server_shutting_down` if a graceful shutdown
        begins (`refuse_body`) before the body is whole, so a client that never finishes its upload
        cannot hold the shutdown open."""
        if self._body_refused:
            raise self._shutting_down()
        try:
            async with asyncio.timeout(None) as scope:
                self._body_scope = scope
                yield
        except TimeoutError:
            if scope.expired() and self._body_refused:
                raise self._shutting_down() from None
            raise
        finally:
            self._body_scope = None

    def _shutting_down(self) -> APIError:
        self.metrics.reject("server_shutting_down")
        return server_shutting_down()

    def refuse_body(self) -> None:
        """A graceful shutdown began: a body still being read (or not yet read) is no longer waited for."""
        self._body_refused = True
        if self._body_scope is not None:
            self._body_scope.reschedule(asyncio.get_running_loop().time())


class ExchangeMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        settings = state.settings
        now = asyncio.get_running_loop().time()
        request_id, has_body = _read_headers(scope)
        exchange = Exchange(
            request_id=request_id,
            method=scope["method"],
            path=scope["path"],
            client=(scope.get("client") or ("-",))[0],
            started=now,
            deadline=None if settings.request_timeout is None else now + settings.request_timeout,
            first_token_deadline=now + settings.first_token_timeout if settings.first_token_timeout else None,
            admission=state.admission,
            metrics=state.metrics,
            body_received=not has_body,
        )
        header = (b"x-request-id", exchange.request_id.encode())
        # HTTP/2 and 3 end a request's stream without ending the connection (and forbid the header).
        may_close = scope.get("http_version") in ("1.0", "1.1")

        async def receive_and_note() -> dict:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                exchange.body_received = True
            return message

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                headers = [*message.get("headers", []), header]
                if may_close and not exchange.body_received and not _says_close(headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                exchange.bytes_sent += len(message.get("body", b""))
                exchange.completed = not message.get("more_body", False)
            await send(message)

        token = _current.set(exchange)
        state.enter(exchange)
        try:
            await self.app(scope, receive_and_note if has_body else receive, send_and_note)
        finally:
            _current.reset(token)
            exchange.close()
            state.leave(exchange)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(_access_line(exchange, asyncio.get_running_loop().time()))


def _read_headers(scope: dict) -> tuple[str, bool]:
    """The request's id (see the module docstring) and whether a body follows its headers."""
    request_id = None
    has_body = False
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and request_id is None:
            candidate = value.decode("latin-1")
            request_id = candidate if _CLIENT_REQUEST_ID.fullmatch(candidate) else ""
        elif name == b"content-length":
            has_body = value.strip() not in (b"0", b"")
        elif name == b"transfer-encoding":
            has_body = True
    return request_id or uuid.uuid4().hex, has_body


def _says_close(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"connection" and value.lower() == b"close" for name, value in headers)


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
