"""POST /v1/chat/completions: messages through the chat template, then one choice per `n`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.engine.engine import Engine
from serving.engine.request import EngineRequest
from serving.http.async_engine import collect, fan_out, generate
from serving.http.body import read_body
from serving.http.errors import APIError
from serving.http.openapi import streams
from serving.http.params import check_context_length, generation_config
from serving.http.prompts import chat_prompt_ids
from serving.http.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ErrorResponse,
    Usage,
)
from serving.http.sse import sse_response
from serving.http.state import server_state

blueprint = Blueprint("chat", __name__)


@blueprint.post("/v1/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletionResponse, 200)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 503)
@streams(ChatCompletionChunk)
async def chat_completions() -> Response | dict[str, Any]:
    """Create a chat completion.

    With `stream: true` the answer is `text/event-stream`: `data: {ChatCompletionChunk}` events (the
    first of each choice carries the role, the last its finish_reason), an optional usage chunk
    (`stream_options.include_usage`), then `data: [DONE]`.
    """
    body = await read_body(ChatCompletionRequest)
    state = server_state()
    state.require_model(body.model)
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    state.require_ready()
    engine = state.engine
    prompt_ids = await asyncio.to_thread(
        chat_prompt_ids,
        engine.tokenizer,
        body.messages,
        body.chat_template_kwargs,
        state.settings.chat_template,
    )
    config = generation_config(body, state.generation_defaults)
    check_context_length([prompt_ids], config.max_new_tokens, engine.max_session_len, "messages")
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = fan_out(engine, [prompt_ids], config, body.n or 1, completion_id, state.settings.max_log_len)
    header = {"id": completion_id, "created": int(time.time()), "model": body.model}
    if body.stream:
        return sse_response(_chunks(engine, requests, header, len(prompt_ids), body.include_usage))
    results = await collect(engine, requests)
    completion_tokens = sum(r.num_completion_tokens for r in results)
    return ChatCompletionResponse(
        **header,
        choices=[
            ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ],
        usage=Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=completion_tokens,
            total_tokens=len(prompt_ids) + completion_tokens,
        ),
    ).model_dump()


async def _chunks(
    engine: Engine,
    requests: Sequence[EngineRequest],
    header: dict[str, Any],
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncGenerator[dict[str, Any], None]:
    # OpenAI sends `"usage": null` on every chunk only when usage was asked for.
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
        return ChatCompletionChunk(**header, choices=choices, usage=usage).model_dump(exclude=exclude)

    for index in range(len(requests)):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    completion_tokens = [0] * len(requests)
    async with aclosing(generate(engine, requests)) as deltas:
        async for index, delta in deltas:
            completion_tokens[index] = delta.num_completion_tokens
            if delta.text or delta.finished:
                yield chunk(
                    [
                        ChatChunkChoice(
                            index=index,
                            delta=ChatDelta(content=delta.text or None),
                            finish_reason=delta.finish_reason,
                        )
                    ]
                )
    if include_usage:
        total = sum(completion_tokens)
        yield chunk(
            [],
            Usage(prompt_tokens=prompt_tokens, completion_tokens=total, total_tokens=prompt_tokens + total),
        )
