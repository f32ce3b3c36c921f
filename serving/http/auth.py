"""API keys: one before-request hook in front of every route, deny by default.

Only the probes stay open (an orchestrator's probe should not carry a secret, and they reveal
nothing), plus GET /metrics when the operator asks for it (`--public-metrics`). The hook runs for
every request, whatever route it matches (or none), so a new route is guarded without anyone
remembering to guard it (`tests/test_http_guarded.py` walks the URL map to prove it); WebSocket
upgrades get the same hook. OPTIONS is no exception, except for a browser's CORS preflight when
CORS is on (a preflight carries no credentials by design): otherwise its answer would tell anyone
which routes exist. Keys are compared as SHA-256 digests in constant time, so neither a key's length
nor its prefix leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from quart import Quart, request, websocket
from werkzeug.datastructures import Headers

from serving.http.errors import APIError

OPEN_PATHS = frozenset({"/health", "/v1/ready"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def install_api_keys(app: Quart, api_keys: Iterable[str], public_metrics: bool = False, cors: bool = False) -> None:
    """Require a key on every request but the open paths' (and CORS preflights, with `cors`)."""
    digests = [_digest(key) for key in api_keys]
    if not digests:
        return
    open_paths = OPEN_PATHS | {"/metrics"} if public_metrics else OPEN_PATHS

    @app.before_request
    async def require_api_key() -> None:
        if request.path in open_paths or (cors and _is_preflight(request.method, request.headers)):
            return
        _require_key(request.headers, digests)

    @app.before_websocket
    async def require_api_key_for_websocket() -> None:
        if websocket.path not in open_paths:
            _require_key(websocket.headers, digests)


def _is_preflight(method: str, headers: Headers) -> bool:
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


def _require_key(headers: Headers, digests: list[bytes]) -> None:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    presented = _digest(token.strip())
    # Compare against every key, not stopping at a match, so timing says nothing about which.
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(presented, digest)
    if scheme.lower() != "bearer" or not matched:
        raise APIError(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
            code="invalid_api_key",
        )
