"""Probes, discovery and metrics: GET /health (liveness), GET /v1/ready (readiness), GET /v1/models,
GET /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request
from quart_schema import document_response

from serving.http.openapi import document_errors, text_response
from serving.http.protocol import Health, ModelCard, ModelList, Readiness
from serving.http.state import server_state

blueprint = Blueprint("service", __name__)


@blueprint.get("/health")
@document_response(Health, 200)
@document_errors(503)
async def health() -> dict[str, Any]:
    """Liveness: 200 while the process can serve or is still loading; 503 once the engine has failed, or
    while it is stuck (--engine-stall-timeout)."""
    error = server_state().health_error()
    if error is not None:
        raise error
    return Health().model_dump()


@blueprint.get("/v1/ready")
@document_response(Readiness, 200)
@document_errors(503)
async def ready() -> dict[str, Any]:
    """Readiness: 200 once the model is loaded and every bucket compiled; 503 before (and after a failure)."""
    state = server_state()
    state.require_ready()
    return Readiness(ready=True, model=state.settings.model_name).model_dump()


@blueprint.get("/v1/models")
@document_response(ModelList, 200)
async def models() -> dict[str, Any]:
    """The served model (OpenAI's list shape), with its session length."""
    state = server_state()
    card = ModelCard(
        id=state.settings.model_name,
        created=state.created,
        root=state.settings.model_path,
        max_model_len=state.engine.max_session_len,
    )
    return ModelList(data=[card]).model_dump()


@blueprint.get("/metrics")
@text_response("text/plain")
async def metrics() -> Response:
    """Prometheus metrics under vLLM's names: the text exposition format, or OpenMetrics if the Accept
    header asks for it."""
    body, content_type = server_state().metrics.exposition(request.headers.get("Accept", ""))
    return Response(body, content_type=content_type)
