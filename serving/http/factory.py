"""The Quart app factory: routes, OpenAPI + Swagger UI, the chat page, errors, API keys, CORS, the per-request
middleware (ids, access log, admission clean-up), the profiling routes and the engine's lifecycle."""

from __future__ import annotations

import asyncio

from quart import Quart, request
from quart_schema import Info, QuartSchema

from serving.engine.client import EngineClient
from serving.http import chat, completions, embeddings, encode, generate, interactive, messages, responses, service
from serving.http.auth import install_api_keys
from serving.http.errors import APIError, install_error_handlers
from serving.http.exchange import ExchangeMiddleware
from serving.http.openapi import NamedSchemaProvider
from serving.http.profiling import install_profiler
from serving.http.settings import ServerSettings
from serving.http.state import ServerState
from serving.http.swagger import install_swagger_ui
from serving.http.webui import install_webui

API_TITLE = "xlserve"
API_VERSION = "0.1.0"


def create_app(engine: EngineClient, settings: ServerSettings) -> Quart:
    """An app serving `engine`, which it starts when serving begins and shuts down at the end."""
    # No static folder: Quart would otherwise serve ./static of whatever directory the server runs in.
    app = Quart("xlserve", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    state = ServerState(engine, settings)
    app.extensions["xlserve"] = state
    app.asgi_app = ExchangeMiddleware(app.asgi_app, state)  # type: ignore[method-assign]

    bearer = {"bearer": {"type": "http", "scheme": "bearer"}} if settings.api_keys else None
    QuartSchema(
        app,
        openapi_path="/openapi.json",
        swagger_ui_path=None,  # its page loads Swagger UI from a CDN: ours is served from this server
        redoc_ui_path=None,
        scalar_ui_path=None,
        info=Info(
            title=API_TITLE,
            version=API_VERSION,
            description="OpenAI-compatible LLM serving on JAX/XLA, with LMDeploy's commands.",
        ),
        security_schemes=bearer,
        security=[{"bearer": []}] if bearer else None,
        openapi_provider_class=NamedSchemaProvider,
    )
    for module in (service, chat, completions, embeddings, interactive, encode, generate, responses, messages):
        app.register_blueprint(module.blueprint)
    install_profiler(app, engine, settings.profile_dir)
    install_error_handlers(app)

    @app.before_request
    async def refuse_while_draining() -> None:
        state.refuse_while_draining(request.path)

    install_swagger_ui(app, "/docs" if settings.webui and settings.chat_at_root else "/")
    page_paths = install_webui(app, settings.chat_at_root) if settings.webui else frozenset()
    install_api_keys(app, settings.api_keys, settings.public_metrics, open_paths=page_paths,
                     cors=bool(settings.allow_origins))

    @app.before_websocket
    async def refuse_websockets() -> None:  # after the key check: without a key, a 401 like any route's
        raise APIError(400, "this server has no WebSocket routes; send plain HTTP requests",
                       code="websocket_not_supported")

    if settings.allow_origins:
        # Imported only here: CORS is off unless asked for, and a server without it needs no quart-cors.
        from quart_cors import cors

        cors(
            app,
            allow_origin=list(settings.allow_origins),
            allow_credentials=settings.allow_credentials,
            allow_methods=list(settings.allow_methods),
            allow_headers=list(settings.allow_headers),
            # Browser code may read these off an answer: the id to quote in a bug report, and when to retry.
            expose_headers=["X-Request-Id", "Retry-After"],
        )

    @app.before_serving
    async def start_engine() -> None:
        state.start_in_background()

    @app.after_serving
    async def stop_engine() -> None:
        await asyncio.to_thread(state.shutdown)

    return app
