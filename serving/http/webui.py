"""The built-in chat page: GET /chat and its script and style sheet, from the package's `static/` folder.

One self-contained page (no CDN, no build step), served with `Content-Security-Policy: default-src
'self'`: it loads nothing from elsewhere, runs no inline code, and shows model output as text only, so
a reply that contains `<script>` can never run. Its API calls go to the same origin (`v1/...`), with the
API key the user typed (kept in the tab's sessionStorage), like any other client.

`install_webui` is all an app needs to serve the page: the api_server calls it (unless `--no-webui`),
and so can any app that forwards the OpenAI routes (`xlserve serve webui URL`, the proxy). The page
itself carries no data, so its paths (which `install_webui` returns) are open without a key: a browser
cannot send one when it opens a page. The routes the page calls are not.
"""

from __future__ import annotations

from importlib import resources

from quart import Quart, Response, redirect
from quart_schema import hide

CHAT_PATH = "/chat"
# path -> (file in static/, content type)
_ASSETS = {
    CHAT_PATH: ("chat.html", "text/html; charset=utf-8"),
    f"{CHAT_PATH}/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    f"{CHAT_PATH}/chat.css": ("chat.css", "text/css; charset=utf-8"),
}

CONTENT_SECURITY_POLICY = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a restarted server of a newer version serves its own page
}


def static_file(name: str) -> bytes:
    """A file of the package's static/ folder (installed as package data)."""
    return resources.files("serving.http").joinpath("static", name).read_bytes()


def add_file_route(app: Quart, path: str, body: bytes, content_type: str, headers: dict[str, str]) -> None:
    """GET `path` answers `body`; left out of the OpenAPI document (it is no API)."""

    async def serve() -> Response:
        return Response(body, content_type=content_type, headers=headers)

    app.add_url_rule(path, f"file:{path}", hide(serve), methods=["GET"])


def install_webui(app: Quart, redirect_root: bool = False) -> frozenset[str]:
    """Serve the chat page at /chat (with `redirect_root`, GET / redirects there); returns the paths served."""
    for path, (name, content_type) in _ASSETS.items():
        add_file_route(app, path, static_file(name), content_type, PAGE_HEADERS)
    if redirect_root:

        async def to_chat() -> Response:
            return redirect(CHAT_PATH)

        app.add_url_rule("/", "webui_root", hide(to_chat), methods=["GET"])
        return frozenset({*_ASSETS, "/"})
    return frozenset(_ASSETS)
