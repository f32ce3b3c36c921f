"""Every error the server sends, in OpenAI's envelope: `{"error": {message, type, param, code}}`; on the
Anthropic Messages routes (`/v1/messages...`) in Anthropic's: `{"type": "error", "error": {type, message}}`.

Clients (the openai SDK, LangChain, Open WebUI) parse this body to show the reason, so no route may
answer a bare HTML page or a `{"detail": ...}`. Routes raise `APIError`; everything else that escapes a
handler (werkzeug's HTTP errors such as 405/413, the engine's `InvalidRequestError`, bugs) is turned
into the same envelope by the handlers `install_error_handlers` registers.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from serving.request import InvalidRequestError

logger = logging.getLogger(__name__)

# Seconds a client told to come back (503) is asked to wait. Slots free up as fast as requests finish
# (typically well under a second), and the openai SDK honours the header, so a short wait keeps retries
# cheap; behind a load balancer the retry may as well go to another replica.
RETRY_AFTER_S = 1

# The engine names options like LMDeploy; a client only knows the OpenAI field it sent.
_OPENAI_PARAM_NAMES = {
    "max_new_tokens": "max_tokens",
    "random_seed": "seed",
    "stop_words": "stop",
    "prompt_token_ids": "prompt",
}


class APIError(Exception):
    """An error answer: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        # e.g. Retry-After on a 503, which the openai SDK and proxies read before retrying
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": anthropic_error_type(self.status), "message": self.message}}

    def response(self) -> Response:
        anthropic = has_request_context() and request.path.startswith(ANTHROPIC_PREFIX)
        response = jsonify(self.anthropic_body() if anthropic else self.body())
        response.status_code = self.status
        response.headers.update(self.headers)
        if self.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response


def unavailable(message: str, code: str) -> APIError:
    """A 503 the client may retry (here after `Retry-After`, or at once elsewhere): nothing was generated."""
    return APIError(503, message, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def server_shutting_down() -> APIError:
    error = unavailable("the server is shutting down; send the request to another replica", "server_shutting_down")
    # Connection: close, so a client's retry opens a new connection (perhaps to another pod).
    error.headers["Connection"] = "close"
    return error


ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    """Anthropic's `error.type` for a status."""
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_type(status: int) -> str:
    """OpenAI's `type` for a status (a bad API key too is an `invalid_request_error` there)."""
    return "invalid_request_error" if status < 500 else "server_error"


def from_invalid_request(error: InvalidRequestError) -> APIError:
    """The engine refused a request's options: a 400 naming the OpenAI field."""
    param = _OPENAI_PARAM_NAMES.get(error.param or "", error.param)
    return APIError(400, error.message, param=param, code=error.code)


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(APIError)
    async def api_error(error: APIError) -> Response:
        return error.response()

    @app.errorhandler(InvalidRequestError)
    async def invalid_request(error: InvalidRequestError) -> Response:
        return from_invalid_request(error).response()

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        response = APIError(status, error.description or error.name, code=code).response()
        # 405 must say which methods are allowed; werkzeug put them on its own response.
        allowed = getattr(error, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        logger.exception("unhandled error while serving a request")
        return APIError(500, f"internal server error: {type(error).__name__}: {error}").response()
