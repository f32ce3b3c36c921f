"""Swagger UI for the OpenAPI document, served entirely by this server, so it works without the internet.

quart-schema's own page loads Swagger UI's script and style sheet from a CDN, which an air-gapped
cluster cannot reach. Swagger UI's files come instead from `swagger-ui-bundle-v2` (the dist files of
a Swagger UI 5 release, which reads OpenAPI 3.1, repackaged by the maintainers of connexion's
`swagger-ui-bundle`), served under /swagger-ui/; the page and its start-up script are ours, with no
inline code, under a Content-Security-Policy that allows nothing but this server.
"""

from __future__ import annotations

from pathlib import Path

from quart import Quart
from swagger_ui_bundle import swagger_ui_path

from serving.http.webui import PAGE_HEADERS, add_file_route, static_file

ASSETS_PATH = "/swagger-ui"
# Swagger UI's files the page loads, by name in the bundle's folder -> content type.
_BUNDLED = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
# Swagger UI draws some icons (select arrows, ...) from data: URLs in its style sheet.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}


def install_swagger_ui(app: Quart, page_path: str = "/") -> None:
    """Serve Swagger UI at `page_path` (reading /openapi.json) and its files under /swagger-ui/."""
    bundle = Path(str(swagger_ui_path))
    files = {f"{ASSETS_PATH}/{name}": (bundle.joinpath(name).read_bytes(), kind) for name, kind in _BUNDLED.items()}
    files[f"{ASSETS_PATH}/xlserve-swagger.js"] = (static_file("swagger.js"), "text/javascript; charset=utf-8")
    files[page_path] = (static_file("swagger.html"), "text/html; charset=utf-8")
    for path, (body, content_type) in files.items():
        add_file_route(app, path, body, content_type, _HEADERS)
