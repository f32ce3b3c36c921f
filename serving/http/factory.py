"""The Quart app factory: routes, OpenAPI + Swagger UI, errors, API keys, CORS and the engine's lifecycle."""

from __future__ import annotations

import asyncio

from quart import Quart
from quart_schema import Info, QuartSchema

from serving.engine.engine import Engine
from serving.http import chat, completions, service
from serving.http.auth import install_api_keys
from serving.http.errors import install_error_handlers
from serving.http.openapi import NamedSchemaProvider
from serving.http.settings import ServerSettings
from serving.http.state import ServerState

API_TITLE = "xlserve"
API_VERSION = "0.1.0"


def create_app(engine: Engine, settings: ServerSettings) -> Quart:
    """An app serving `engine`, which it starts when serving begins and shuts down at the end."""
    app = Quart("xlserve")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    state = ServerState(engine, settings)
    app.extensions["xlserve"] = state

    bearer = {"bearer": {"type": "http", "scheme": "bearer"}} if settings.api_keys else None
    QuartSchema(
        app,
        openapi_path="/openapi.json",
        swagger_ui_path="/",
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
    for module in (service, chat, completions):
        app.register_blueprint(module.blueprint)
    install_error_handlers(app)
    install_api_keys(app, settings.api_keys)
    if settings.allow_origins:
        # Imported only here: CORS is off unless asked for, and a server without it needs no quart-cors.
        from quart_cors import cors

        cors(
            app,
            allow_origin=list(settings.allow_origins),
            allow_credentials=settings.allow_credentials,
            allow_methods=list(settings.allow_methods),
            allow_headers=list(settings.allow_headers),
        )

    @app.before_serving
    async def start_engine() -> None:
        state.start_in_background()

    @app.after_serving
    async def stop_engine() -> None:
        await asyncio.to_thread(state.shutdown)

    return app
