"""API keys: one before-request hook in front of every route, deny by default.

Only the probes stay open (an orchestrator's probe should not carry a secret, and they reveal
nothing), plus GET /metrics when the operator asks for it (`--public-metrics`) and the chat page's
files (a browser opening a page sends no key; the API calls the page makes need one). The hook runs for
every request, whatever route it matches (or none), so a new route is guarded without anyone
remembering to guard it (`tests/test_http_guarded.py` walks the URL map to prove it); WebSocket
upgrades get the same hook. OPTIONS is no exception, except for a browser's CORS preflight when
CORS is on (a preflight carries no credentials by design): otherwise its answer would tell anyone
which routes exist. Keys are compared as SHA-256 digests in constant time, so neither a key's length
nor its prefix leaks through timing.
The proxy (`serving.proxy.auth`) checks its two sets of keys with the same `KeyRing`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from quart import Quart, request, websocket
from werkzeug.datastructures import Headers

from serving.http.errors import APIError

OPEN_PATHS = frozenset({"/health", "/v1/ready"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """A set of accepted keys, checked against a request's `Authorization: Bearer KEY` (or `x-api-key`)."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(key) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def admits(self, headers: Mapping[str, str]) -> bool:
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if "x-api-key" in headers:  # Anthropic's clients send the key there
            scheme, token = "bearer", headers["x-api-key"]
        presented = _digest(token.strip())
        # Compare against every key, not stopping at a match, so timing says nothing about which.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched and scheme.lower() == "bearer"


def missing_key() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`).",
        code="invalid_api_key",
    )


def install_api_keys(
    app: Quart, api_keys: Iterable[str], public_metrics: bool = False, open_paths: Iterable[str] = (),
    cors: bool = False,
) -> None:
    """Require a key on every path but the probes, /metrics with `public_metrics`, and `open_paths`
    (pages a browser opens, which cannot carry a key, such as the chat page: not the API they call);
    with `cors`, a browser's CORS preflight needs none either. WebSocket upgrades need one too."""
    keys = KeyRing(api_keys)
    if not keys:
        return
    open_paths = OPEN_PATHS | frozenset(open_paths) | ({"/metrics"} if public_metrics else set())

    @app.before_request
    async def require_api_key() -> None:
        if request.path in open_paths or (cors and _is_preflight(request.method, request.headers)):
            return
        if not keys.admits(request.headers):
            raise missing_key()

    @app.before_websocket
    async def require_api_key_for_websocket() -> None:
        if websocket.path not in open_paths and not keys.admits(websocket.headers):
            raise missing_key()


def _is_preflight(method: str, headers: Headers) -> bool:
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers
