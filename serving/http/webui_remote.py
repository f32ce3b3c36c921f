"""`xlserve serve webui URL` (and LMDeploy's name for it, `xlserve serve gradio URL`): the chat page for
an API server that runs elsewhere, with no gradio needed.

The app serves the same page as the api_server's /chat (GET / redirects there) and forwards the three
routes the page calls to the API server as they are: the page stays same-origin, so its strict
Content-Security-Policy holds and the API server needs no CORS. The user's `Authorization` header goes
through, so a server behind `--api-keys` sees the key typed in the page. A stream is relayed as it
arrives, and when the browser goes away (Stop) the upstream connection is closed, which aborts the
request on the API server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from quart import Quart, Response, request
from quart_schema import hide

from serving.http.errors import APIError, install_error_handlers
from serving.http.webui import install_webui

# The page's calls: (path, method)
FORWARDED_ROUTES = (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/v1/chat/interactive", "POST"))
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept", "X-Request-Id")
RELAYED_HEADERS = ("Content-Type", "X-Request-Id", "Retry-After", "WWW-Authenticate")
CONNECT_TIMEOUT_S = 10.0


def normalize_api_url(url: str) -> str:
    """LMDeploy accepts `0.0.0.0:23333` as well as `http://0.0.0.0:23333`: add the scheme, drop a last /."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = f"http://{url}"
    if url.endswith("/v1"):
        url = url.removesuffix("/v1")
    return url


def create_webui_app(api_url: str) -> Quart:
    """An app serving the chat page, whose API calls go to the server at `api_url`."""
    api_url = normalize_api_url(api_url)
    app = Quart("xlserve-webui", static_folder=None)
    install_webui(app, redirect_root=True)
    install_error_handlers(app)
    clients: list[httpx.AsyncClient] = []

    @app.before_serving
    async def open_client() -> None:
        # No read timeout: a reply may pause for as long as the API server queues it.
        clients.append(httpx.AsyncClient(timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=None)))

    @app.after_serving
    async def close_client() -> None:
        for client in clients:
            await client.aclose()

    async def forward() -> Response:
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        upstream_request = clients[0].build_request(
            request.method, f"{api_url}{request.path}", headers=headers, content=await request.get_data()
        )
        try:
            upstream = await clients[0].send(upstream_request, stream=True)
        except httpx.TransportError as error:
            raise APIError(502, f"cannot reach the API server at {api_url}: {error}",
                           code="upstream_unreachable") from error

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_bytes():
                    yield chunk
            finally:  # also when the browser has gone: closing the connection aborts the request upstream
                await upstream.aclose()

        relayed = {name: upstream.headers[name] for name in RELAYED_HEADERS if name in upstream.headers}
        response = Response(relay(), status=upstream.status_code, headers=relayed,
                            content_type=upstream.headers.get("Content-Type"))
        response.timeout = None  # a stream lasts as long as the reply
        return response

    for path, method in FORWARDED_ROUTES:
        app.add_url_rule(path, f"forward:{path}", hide(forward), methods=[method])
    return app
