"""POST /v1/completions: raw prompts (no chat template), `n` choices for each."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.http.body import read_body
from serving.http.choices import cached_prompt_tokens, fan_out, generate
from serving.http.engine_client import AsyncEngineClient, collect
from serving.http.errors import APIError
from serving.http.guided import compile_guide, guide_spec
from serving.http.openapi import document_errors, streams
from serving.http.params import fit_context_length, generation_config, prompt_too_long
from serving.http.prompts import completion_prompt_chars, completion_prompt_ids
from serving.http.protocol import (
    MAX_N,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from serving.http.sse import TextEvents, sse_response
from serving.http.state import server_state
from serving.request import EngineRequest
from serving.text.tokenizer import PromptTooLong

blueprint = Blueprint("completions", __name__)


@blueprint.post("/v1/completions")
@document_request(CompletionRequest)
@document_response(CompletionResponse, 200)
@document_errors(400, 404, 408, 413, 500, 503)
@streams(CompletionResponse)
async def completions() -> Response | dict[str, Any]:
    """Create a completion.

    Each prompt (a string, or token ids) gets `n` choices; prompt p's choice i has index p*n+i. With
    `stream: true` the answer is `text/event-stream`: `data: {CompletionResponse}` chunks (each choice's
last with empty text and its finish_reason), an optional
    usage chunk (`stream_options.include_usage`), then `data: [DONE]`.
    """
    body = await read_body(CompletionRequest)
    state = server_state()
    state.require_model(body.model)
    _refuse_unsupported(body)
    state.require_ready()
    engine = state.engine
    prepare = functools.partial(completion_prompt_ids, engine.tokenizer, body.prompt, engine.max_session_len - 1)
    try:
        prompts = await state.prepare_prompt(completion_prompt_chars(body.prompt), prepare)
    except PromptTooLong as error:
        raise prompt_too_long(error, engine.max_session_len, "prompt") from None
    if len(prompts) * (body.n or 1) > MAX_N:
        raise APIError(400, f"at most {MAX_N} choices per request (prompts × n)", param="n")
    config = generation_config(body, state.generation_defaults)
    config.max_new_tokens = fit_context_length(
        prompts, config.max_new_tokens, engine.max_session_len, "prompt", state.settings.strict_context_length
    )
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    guide = await compile_guide(state.guides, guide_spec(body), config, engine.eos_token_ids)
    requests = fan_out(engine, prompts, config, body.n or 1, completion_id, state.settings.max_log_len, guide=guide)
    header = {"id": completion_id, "created": int(time.time()), "model": body.model}
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        return sse_response(_chunks(state.engine_client, requests, header, prompt_tokens, body.include_usage,
                                    body.n or 1))
    results = await collect(generate(state.engine_client, requests), len(requests))
    completion_tokens = sum(r.num_completion_tokens for r in results)
    cached_tokens = cached_prompt_tokens([r.num_cached_tokens for r in results], body.n or 1)
    return CompletionResponse(
        **header,
        choices=[CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)],
        usage=Usage.of(prompt_tokens, completion_tokens, cached_tokens),
    ).model_dump()


def _refuse_unsupported(body: CompletionRequest) -> None:
    """Fields a client relies on the answer reflecting: refuse rather than silently ignore them."""
    if body.echo:
        raise APIError(400, "echo is not supported by this server", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of is not supported; leave it out or set it equal to n", param="best_of")


async def _chunks(
    client: AsyncEngineClient,
    requests: Sequence[EngineRequest],
    header: dict[str, Any],
    prompt_tokens: int,
    include_usage: bool,
    n: int,
) -> AsyncGenerator[dict[str, Any] | bytes, None]:
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> dict[str, Any]:
        return CompletionResponse(**header, choices=choices, usage=usage).model_dump(exclude=exclude)

    text_events = TextEvents(lambda index, text: chunk([CompletionChoice(index=index, text=text, finish_reason=None)]))
    completion_tokens = [0] * len(requests)
    cached_tokens = [0] * len(requests)
    async with aclosing(generate(client, requests)) as deltas:
        async for index, delta in deltas:
            completion_tokens[index] = delta.num_completion_tokens
            cached_tokens[index] = delta.num_cached_tokens
            if delta.text:
                yield text_events(index, delta.text)
            if delta.finished:  # in a chunk of its own, as chat's and /generate's streams end a choice
                yield chunk([CompletionChoice(index=index, text="", finish_reason=delta.finish_reason)])
    if include_usage:
        yield chunk([], Usage.of(prompt_tokens, sum(completion_tokens), cached_prompt_tokens(cached_tokens, n)))
