"""Server-sent events as OpenAI streams them: `data: {json}` events, then `data: [DONE]`.

A failure after the stream has begun can no longer change the HTTP status, so it is sent as a
`data: {"error": {...}}` event before `[DONE]`, which the openai SDK raises as an APIError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from quart import Response

from serving.http.errors import APIError

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_response(events: AsyncGenerator[dict[str, Any], None]) -> Response:
    async def body() -> AsyncIterator[bytes]:
        try:
            # aclosing: if the client goes away while the body waits to send, the events' own
            # clean-up (aborting engine requests) still runs now rather than at garbage collection.
            async with aclosing(events):
                async for payload in events:
                    yield event(payload)
        except APIError as error:
            yield event(error.body())
        except Exception as error:
            logger.exception("a stream failed")
            yield event(APIError(500, f"internal server error: {type(error).__name__}: {error}").body())
        yield DONE

    response = Response(
        body(),
        mimetype="text/event-stream",
        # no-transform/X-Accel-Buffering: proxies such as nginx would otherwise buffer the tokens.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )
    # Quart's RESPONSE_TIMEOUT (60 s) would cut a long generation off mid-stream.
    response.timeout = None
    return response
