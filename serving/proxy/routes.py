"""The proxy's OpenAI routes, relayed to a node, and its own probes and metrics.

`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses` and `/v1/messages` go where the
routing strategy says, among the healthy nodes serving the body's `model`, and so do LMDeploy's `/generate` and
`/v1/encode` (whose `model` is optional); `/v1/chat/interactive` goes to the node that holds its session
(placed by the strategy on its first turn). The body is relayed as the client sent it, byte for byte;
the proxy reads only what routing needs and leaves validation to the node, so a node's 400 is the
answer the client gets. `/v1/models` is the union of the nodes' models.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from quart import Blueprint, Response, request
from quart_schema import document_request, document_response

from serving.http.body import validation_error
from serving.http.errors import APIError
from serving.http.openapi import document_errors, streams, text_response
from serving.http.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelList,
)
from serving.proxy.forward import upstream_headers
from serving.proxy.prompt_pages import PromptPages
from serving.proxy.protocol import AnyBody, InteractiveFields, ProxyReadiness
from serving.proxy.routing import RoutedRequest
from serving.proxy.state import ProxyState, proxy_state

blueprint = Blueprint("proxy", __name__)

ONE_OFF_SESSION = -1  # LMDeploy's "no session" id


async def _read_body() -> tuple[bytes, dict[str, Any]]:
    raw = await request.get_data(cache=False)
    try:
        body = AnyBody.model_validate_json(raw)
    except ValidationError as error:
        raise validation_error(error) from None
    return raw, body.model_extra or {}


def _model(body: dict[str, Any], state: ProxyState, required: bool) -> str | None:
    """The body's model, which some node must serve (404 otherwise, like one api_server's answer)."""
    model = body.get("model")
    if model is None and not required:
        return None
    if not isinstance(model, str):
        raise APIError(400, "model: a string naming the model is required", param="model")
    if not state.registry.knows(model):
        state.metrics.errors.labels("model_not_found").inc()
        shown = model if len(model) <= 256 else f"{model[:256]}..."
        raise APIError(404, f"The model `{shown}` is not served by any node; GET /v1/models lists those that are.",
                       param="model", code="model_not_found")
    return model


def _session_key(body: dict[str, Any], state: ProxyState) -> str | None:
    """`session` routing's key: the --session-key header, else OpenAI's `user` field."""
    header = request.headers.get(state.settings.session_key)
    if header:
        return header
    user = body.get("user")
    return user if isinstance(user, str) and user else None


# The bodies of /v1/responses, /v1/messages, /generate and /v1/encode are documented by api_server's own
# schema; the proxy does not import those routes (they pull in the engine) and documents only its errors.
async def _relay(path: str, model_required: bool = True) -> Response:
    state = proxy_state()
    raw, body = await _read_body()
    routed = RoutedRequest(_model(body, state, required=model_required), PromptPages.of(path, body),
                           _session_key(body, state))
    response, _ = await state.relay.send(path, raw, _headers(), routed)
    return response


def _headers() -> dict[str, str]:
    return upstream_headers(request.headers, proxy_state().settings.node_api_key, request.remote_addr)


@blueprint.post("/v1/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletionResponse, 200)
@document_errors(400, 404, 502, 503)
@streams(ChatCompletionChunk)
async def chat_completions() -> Response:
    """Relayed to a node serving `model`; streams arrive chunk by chunk. A node's own errors come back
    unchanged; 503 (with Retry-After) when no node is in rotation, 502 when none could answer."""
    return await _relay("/v1/chat/completions")


@blueprint.post("/v1/completions")
@document_request(CompletionRequest)
@document_response(CompletionResponse, 200)
@document_errors(400, 404, 502, 503)
@streams(CompletionResponse)
async def completions() -> Response:
    """Relayed to a node serving `model`, as /v1/chat/completions."""
    return await _relay("/v1/completions")


@blueprint.post("/v1/embeddings")
@document_errors(400, 404, 502, 503)
async def embeddings() -> Response:
    """Relayed to a node serving `model`, as /v1/chat/completions; routed by its first input, as a batch of
    completion prompts is."""
    return await _relay("/v1/embeddings")


@blueprint.post("/v1/responses")
@document_errors(400, 404, 502, 503)
async def responses() -> Response:
    """OpenAI's Responses API, relayed to a node serving `model`, as /v1/chat/completions."""
    return await _relay("/v1/responses")


@blueprint.post("/v1/messages")
@document_errors(400, 404, 502, 503)
async def messages() -> Response:
    """Anthropic's Messages API, relayed to a node serving `model`; the node's answers (and its errors, in
    Anthropic's format) come back unchanged."""
    return await _relay("/v1/messages")


@blueprint.post("/generate")
@document_errors(400, 404, 502, 503)
async def generate() -> Response:
    """LMDeploy's /generate, relayed to a node (one serving `model` when it is given)."""
    return await _relay("/generate", model_required=False)


@blueprint.post("/v1/encode")
@document_errors(400, 404, 502, 503)
async def encode() -> Response:
    """LMDeploy's /v1/encode, relayed to a node (one serving `model` when it is given)."""
    return await _relay("/v1/encode", model_required=False)


@blueprint.post("/v1/chat/interactive")
@document_request(InteractiveFields)
@document_errors(400, 404, 502, 503)
async def chat_interactive() -> Response:
    """LMDeploy's interactive chat, relayed to the node holding the session: every turn of a session goes
    to the node that answered its first (if that node left, the next turn starts the session afresh on
    another). A turn with `interactive_mode: false` ends the session there. The answer is the node's: a
    JSON object, or NDJSON lines when streaming."""
    state = proxy_state()
    raw, body = await _read_body()
    session_id = body.get("session_id", ONE_OFF_SESSION)
    kept = isinstance(session_id, int) and session_id != ONE_OFF_SESSION
    path = "/v1/chat/interactive"
    key = _session_key(body, state) or (str(session_id) if kept else None)
    routed = RoutedRequest(_model(body, state, required=False), PromptPages.of(path, body), key)
    holder = state.session_node(session_id) if kept else None
    response, node = await state.relay.send(path, raw, _headers(), routed, first=holder)
    if kept and node is not None and response.status_code == 200:
        if body.get("interactive_mode") is True:
            state.pin_session(session_id, node)
        elif not body.get("cancel"):
            state.end_session(session_id)
    return response


@blueprint.get("/v1/models")
@document_response(ModelList, 200)
async def models() -> dict[str, Any]:
    """Every model some node serves (each once), whether or not that node is in rotation right now."""
    return {"object": "list", "data": proxy_state().registry.model_cards()}


@blueprint.get("/health")
@document_response(Health, 200)
async def health() -> dict[str, Any]:
    """Liveness: 200 while the proxy runs."""
    return Health().model_dump()


@blueprint.get("/v1/ready")
@document_response(ProxyReadiness, 200)
@document_errors(503)
async def ready() -> dict[str, Any]:
    """Readiness: 200 while at least one node is in rotation."""
    healthy = sum(node.healthy for node in proxy_state().registry)
    if not healthy:
        raise APIError(503, "no node is in rotation yet", code="no_healthy_node")
    return ProxyReadiness(ready=True, nodes=healthy).model_dump()


@blueprint.get("/metrics")
@text_response("text/plain")
async def metrics() -> Response:
    """Prometheus metrics: per node, requests in flight, sent and failed, and health; routing decisions
    by branch; retries."""
    body, content_type = proxy_state().metrics.exposition(request.headers.get("Accept", ""))
    return Response(body, content_type=content_type)
