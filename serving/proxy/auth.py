"""The proxy's two sets of keys, checked before every request, whatever route it matches (or none).

User keys (`--api-keys`) open the OpenAI routes, the docs and /metrics; admin keys (`--admin-api-keys`)
open `/nodes/*` too. A user key never opens `/nodes/*` (403): LMDeploy left those routes open, and
anyone who could send a chat request could add a node of theirs and read every prompt. Once any key is
configured, `/nodes/*` need an admin key; with none at all, everything is open, as on a laptop. The
probes stay open, the chat page's files (a browser opening a page sends no key; the calls it makes
need one), and /metrics with `--public-metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable

from quart import Quart, request

from serving.http.auth import OPEN_PATHS, KeyRing, missing_key
from serving.http.errors import APIError

ADMIN_PREFIX = "/nodes/"


def install_proxy_keys(app: Quart, api_keys: tuple[str, ...], admin_api_keys: tuple[str, ...],
                       public_metrics: bool, open_paths: Iterable[str] = ()) -> None:
    users, admins = KeyRing(api_keys), KeyRing(admin_api_keys)
    if not users and not admins:
        return
    open_paths = OPEN_PATHS | frozenset(open_paths) | ({"/metrics"} if public_metrics else set())

    @app.before_request
    async def require_keys() -> None:
        if request.path in open_paths:
            return
        if admins.admits(request.headers):
            return
        if request.path.startswith(ADMIN_PREFIX):
            if users.admits(request.headers):
                raise APIError(403, "/nodes/* need an admin key (--admin-api-keys); this is a user key.",
                               code="admin_key_required")
            raise missing_key()
        if users and not users.admits(request.headers):
            raise missing_key()
