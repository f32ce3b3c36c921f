"""Reading a JSON request body into a protocol model, with OpenAI's 400 for anything malformed.

One parse (`model_validate_json`) checks the content type's promise, the JSON syntax and every field,
so a bad body can never reach a route as a half-valid dict. Bodies over `MAX_CONTENT_LENGTH` are
refused with 413 by Quart while reading, before any parsing; a body still arriving when a graceful
shutdown begins is refused with 503 (`Exchange.reading_body`).
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import request

from serving.http.errors import APIError
from serving.http.exchange import current_exchange
from serving.http.protocol import UNION_TAGS

M = TypeVar("M", bound=BaseModel)

# Enough to see what is wrong without echoing a whole malformed request back.
MAX_REPORTED_ERRORS = 3


async def read_body(model: type[M]) -> M:
    if not request.is_json:
        raise APIError(
            400,
            f"the request body must be JSON sent with Content-Type: application/json "
            f"(got {request.mimetype or 'no content type'})",
            code="invalid_content_type",
        )
    exchange = current_exchange()
    if exchange is None:
        data = await request.get_data(cache=False)
    else:
        async with exchange.reading_body():  # a graceful shutdown does not wait for a stalled upload
            data = await request.get_data(cache=False)
    try:
        return model.model_validate_json(data)
    except ValidationError as error:
        raise validation_error(error) from None


def validation_error(error: ValidationError) -> APIError:
    problems = error.errors(include_url=False, include_input=False)
    first = problems[0]
    if first["type"] == "json_invalid":
        return APIError(
            400,
            f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}",
            code="invalid_json",
        )
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    parts = [
        f"{_path(p['loc']) or 'body'}: {p['msg'].removeprefix('Value error, ')}" for p in problems[:MAX_REPORTED_ERRORS]
    ]
    if len(problems) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(problems) - MAX_REPORTED_ERRORS} more")
    return APIError(400, "; ".join(parts), param=_path(first["loc"]) or None)


def _path(loc: tuple[int | str, ...]) -> str:
    """`('messages', 0, 'role')` as `messages[0].role`, without pydantic's union branch names."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif item not in UNION_TAGS:
            path += f".{item}" if path else item
    return path
