"""Streamed answers: server-sent events as OpenAI's chat and completions stream them (`data: {json}`
events, then `data: [DONE]`); events named by their payload's `type` (`event: <type>`, no `[DONE]`), as
OpenAI's Responses and Anthropic's Messages APIs stream them; and NDJSON lines as LMDeploy's
interactive route does (`{json}\n`).

A failure after the stream has begun can no longer change the HTTP status, so it is sent as one more
payload, `{"error": {...}}` (before `[DONE]` in SSE, which the openai SDK raises as an APIError), or
in the protocol's own error event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from quart import Response

from serving.http.errors import APIError

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


# Stands in for the text while a chunk's template is dumped; no response text contains a NUL.
_TEXT_MARK = "\x00xlserve-text\x00"


def _dump(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dump(payload) + b"\n\n"


def typed_event(payload: dict[str, Any]) -> bytes:
    return b"event: " + payload["type"].encode() + b"\n" + event(payload)


def ndjson_line(payload: dict[str, Any]) -> bytes:
    return _dump(payload) + b"\n"


class TextEvents:
    """The events of one stream's chunks that differ only in one text field (per choice index).

    Building a pydantic chunk and dumping it cost about 10 µs a token, a large share of the event
    loop's time at a few hundred streams. Here the chunk is dumped once per choice with a marker for
    the text, and each event is the two halves around the JSON-encoded text: byte for byte what
    `event(make(index, text))` writes, for any text.
    """

    def __init__(self, make: Callable[[int, str], dict[str, Any]]):
        self._make = make
        self._halves: dict[int, tuple[bytes, bytes]] = {}

    def __call__(self, index: int, text: str) -> bytes:
        halves = self._halves.get(index)
        if halves is None:
            head, _, tail = event(self._make(index, _TEXT_MARK)).partition(json.dumps(_TEXT_MARK).encode())
            halves = self._halves[index] = (head, tail)
        return halves[0] + json.dumps(text, ensure_ascii=False).encode() + halves[1]


def sse_response(events: AsyncGenerator[dict[str, Any] | bytes, None]) -> Response:
    """A streamed answer of `events`: payloads to dump, or events already encoded (`TextEvents`)."""
    return _streamed(events, event, "text/event-stream", DONE)


def typed_sse_response(
    events: AsyncGenerator[dict[str, Any], None], error_payload: Callable[[APIError], dict[str, Any]]
) -> Response:
    """A streamed answer of events named by their `type`; a failure after the start as `error_payload`'s."""
    return _streamed(events, typed_event, "text/event-stream", error_payload=error_payload)


def ndjson_response(lines: AsyncGenerator[dict[str, Any], None]) -> Response:
    """A streamed answer of one JSON object per line."""
    return _streamed(lines, ndjson_line, "application/x-ndjson")


def _streamed(
    payloads: AsyncGenerator[dict[str, Any] | bytes, None],
    encode: Callable[[dict[str, Any]], bytes],
    mimetype: str,
    end: bytes = b"",
    error_payload: Callable[[APIError], dict[str, Any]] = APIError.body,
) -> Response:
    async def body() -> AsyncIterator[bytes]:
        try:
            # aclosing: if the client goes away while the body waits to send, the payloads' own
            # clean-up (aborting engine requests) still runs now rather than at garbage collection.
            async with aclosing(payloads):
                async for payload in payloads:
                    yield payload if isinstance(payload, bytes) else encode(payload)
        except APIError as error:
            yield encode(error_payload(error))
        except Exception as error:
            logger.exception("a stream failed")
            yield encode(error_payload(APIError(500, f"internal server error: {type(error).__name__}: {error}")))
        if end:
            yield end

    response = Response(
        body(),
        mimetype=mimetype,
        # no-transform/X-Accel-Buffering: proxies such as nginx would otherwise buffer the tokens.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )
    # Quart's RESPONSE_TIMEOUT (60 s) would cut a long generation off mid-stream.
    response.timeout = None
    return response
