"""The proxy's Quart app: its routes, OpenAPI, Swagger UI and the chat page (the api_server's own),
OpenAI error bodies, its two sets of keys, and its life cycle (the HTTP pool and the health checks start
when serving begins and stop when it ends)."""

from __future__ import annotations

from quart import Quart
from quart_schema import Info, QuartSchema

from serving.http.errors import install_error_handlers
from serving.http.openapi import NamedSchemaProvider
from serving.http.swagger import install_swagger_ui
from serving.http.webui import install_webui
from serving.proxy import admin, routes
from serving.proxy.auth import install_proxy_keys
from serving.proxy.forward import ReleaseMiddleware
from serving.proxy.settings import ProxySettings
from serving.proxy.state import ProxyState

API_TITLE = "xlserve proxy"
API_VERSION = "0.1.0"


def create_proxy_app(settings: ProxySettings) -> Quart:
    app = Quart("xlserve-proxy", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    state = ProxyState(settings)
    app.extensions["xlserve_proxy"] = state
    app.asgi_app = ReleaseMiddleware(app.asgi_app)  # type: ignore[method-assign]
    keyed = bool(settings.api_keys or settings.admin_api_keys)
    bearer = {"bearer": {"type": "http", "scheme": "bearer"}} if keyed else None
    QuartSchema(
        app,
        openapi_path="/openapi.json",
        swagger_ui_path=None,  # quart-schema's page loads from a CDN: the api_server's own is served instead
        redoc_ui_path=None,
        scalar_ui_path=None,
        info=Info(
            title=API_TITLE,
            version=API_VERSION,
            description="One OpenAI-compatible address in front of many xlserve (or LMDeploy) api_servers, "
            "with LMDeploy's /nodes routes.",
        ),
        security_schemes=bearer,
        security=[{"bearer": []}] if bearer else None,
        openapi_provider_class=NamedSchemaProvider,
    )
    app.register_blueprint(routes.blueprint)
    app.register_blueprint(admin.blueprint)
    install_error_handlers(app)
    install_swagger_ui(app, "/")
    page_paths = install_webui(app)  # the chat page, whose API calls come here like any client's
    install_proxy_keys(app, settings.api_keys, settings.admin_api_keys, settings.public_metrics, page_paths)

    @app.before_serving
    async def start() -> None:
        await state.start()

    @app.after_serving
    async def stop() -> None:
        await state.stop()

    return app
