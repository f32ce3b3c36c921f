"""POST /generate: LMDeploy's token-level route (SGLang's shape): a prompt as text or as token ids in,
the generated text with its token ids and `meta_info` out, streamed or not.

Exactly one of `prompt` (encoded with the tokenizer's BOS, no chat template) and `input_ids` (used as
given). `max_tokens` defaults to 128, as LMDeploy's. The answer is `{text, output_ids, meta_info:
{prompt_tokens, completion_tokens, cached_tokens, finish_reason: {type}}}`; with `stream: true`, SSE
events of that shape hold the new text and ids, the last one (empty text) the finish reason, then
`data: [DONE]`. Admission, limits, deadline, metrics and auth are the other routes' (`choices`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any

from pydantic import BaseModel, Field
from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.http.body import read_body
from serving.http.choices import fan_out, generate
from serving.http.engine_client import AsyncEngineClient, collect
from serving.http.errors import APIError
from serving.http.openapi import document_errors, streams
from serving.http.params import fit_context_length, generation_config
from serving.http.protocol import SamplingFields, lax
from serving.http.sse import sse_response
from serving.http.state import server_state
from serving.request import EngineRequest
from serving.text.output import TextDelta

blueprint = Blueprint("generate", __name__)

DEFAULT_MAX_TOKENS = 128  # LMDeploy's


class GenerateRequest(SamplingFields):
    model: str | None = Field(None, description="Optional; if given, the served model name.")
    prompt: str | None = Field(None, description="The prompt text (no chat template); or give `input_ids`.")
    input_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="The prompt as token ids.")
    max_tokens: lax(int, ge=1) | None = Field(DEFAULT_MAX_TOKENS, description="Most tokens to generate.")
    return_logprob: lax(bool) | None = Field(None, description="Not supported: only false or null.")
    image_data: Any | None = Field(None, description="Not supported: this server reads text only.")
    session_id: lax(int) | None = Field(None, description="Accepted and ignored (each request stands alone).")


class FinishType(BaseModel):
    type: str = Field(description="stop, length, abort or error.")


class GenerateMeta(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Tokens generated so far (the running total when streaming).")
    cached_tokens: int = Field(description="Prompt tokens taken from the prefix cache.")
    finish_reason: FinishType | None = Field(description="null until the generation ends.")


class GenerateResponse(BaseModel):
    """The whole answer, and each stream event (with the new text and ids only)."""

    text: str
    output_ids: list[int]
    meta_info: GenerateMeta


@blueprint.post("/generate")
@document_request(GenerateRequest)
@document_response(GenerateResponse, 200)
@document_errors(400, 404, 408, 413, 500, 503)
@streams(GenerateResponse)
async def generate_route() -> Response | dict[str, Any]:
    """Generate from a text or token-id prompt (LMDeploy's /generate)."""
    body = await read_body(GenerateRequest)
    state = server_state()
    if body.model is not None:
        state.require_model(body.model)
    param = _refuse_unsupported(body)
    state.require_ready()
    engine = state.engine
    if body.prompt is not None:
        prompt_ids = await asyncio.to_thread(engine.tokenizer.encode, body.prompt)
    else:
        prompt_ids = list(body.input_ids or [])
    config = generation_config(body, state.generation_defaults, engine.tokenizer)
    config.max_new_tokens = fit_context_length(
        [prompt_ids], config.max_new_tokens, engine.max_session_len, param, state.settings.strict_context_length
    )
    requests = fan_out(engine, [prompt_ids], config, 1, f"generate-{uuid.uuid4().hex}", state.settings.max_log_len)
    if body.stream:
        return sse_response(_events(state.engine_client, requests, len(prompt_ids)))
    [result] = await collect(generate(state.engine_client, requests), 1)
    meta = GenerateMeta(prompt_tokens=len(prompt_ids), completion_tokens=result.num_completion_tokens,
                        cached_tokens=result.num_cached_tokens, finish_reason=_finish(result.finish_reason))
    return GenerateResponse(text=result.text, output_ids=result.token_ids, meta_info=meta).model_dump()


def _refuse_unsupported(body: GenerateRequest) -> str:
    """400 for what this route cannot answer; the name of the prompt's field otherwise."""
    if (body.prompt is None) == (body.input_ids is None):
        raise APIError(400, "specify exactly one of prompt and input_ids", param="prompt")
    if body.prompt == "" or body.input_ids == []:
        param = "prompt" if body.prompt is not None else "input_ids"
        raise APIError(400, f"{param} must not be empty", param=param)
    if body.return_logprob:
        raise APIError(400, "return_logprob is not supported by this server", param="return_logprob")
    if body.image_data is not None:
        raise APIError(400, "image_data: this server reads text only", param="image_data")
    if body.n not in (None, 1):
        raise APIError(400, "/generate answers one sequence; use /v1/completions for n > 1", param="n")
    return "prompt" if body.prompt is not None else "input_ids"


async def _events(
    client: AsyncEngineClient, requests: list[EngineRequest], prompt_tokens: int
) -> AsyncGenerator[dict[str, Any], None]:
    async with aclosing(generate(client, requests)) as deltas:
        async for _, delta in deltas:
            if delta.text or delta.token_ids:
                yield _event(delta, prompt_tokens, delta.text, delta.token_ids, None)
            if delta.finished:  # in an event of its own, as the other routes' streams end
                yield _event(delta, prompt_tokens, "", [], delta.finish_reason)


def _event(delta: TextDelta, prompt_tokens: int, text: str, ids: list[int], finish: str | None) -> dict[str, Any]:
    meta = GenerateMeta(prompt_tokens=prompt_tokens, completion_tokens=delta.num_completion_tokens,
                        cached_tokens=delta.num_cached_tokens, finish_reason=_finish(finish))
    return GenerateResponse(text=text, output_ids=ids, meta_info=meta).model_dump()


def _finish(reason: str | None) -> FinishType | None:
    return FinishType(type=reason) if reason is not None else None
