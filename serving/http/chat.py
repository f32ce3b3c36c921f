"""POST /v1/chat/completions: messages through the chat template, then one choice per `n`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.http.body import read_body
from serving.http.chat_run import ChatRun, run_streamed, run_whole, start_chat
from serving.http.choices import cached_prompt_tokens
from serving.http.engine_client import AsyncEngineClient
from serving.http.logprobs import chat_logprobs
from serving.http.openapi import document_errors, streams
from serving.http.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ResponseFunctionCall,
    ResponseToolCall,
    ToolCallDelta,
    Usage,
)
from serving.http.sse import TextEvents, sse_response
from serving.http.state import server_state
from serving.text.chat_output import OutputEvent
from serving.text.tokenizer import Tokenizer
from serving.text.tool_parsers import ToolCall

blueprint = Blueprint("chat", __name__)


@blueprint.post("/v1/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletionResponse, 200)
@document_errors(400, 404, 408, 413, 422, 500, 503)
@streams(ChatCompletionChunk)
async def chat_completions() -> Response | dict[str, Any]:
    """Create a chat completion.

    With `stream: true` the answer is `text/event-stream`: `data: {ChatCompletionChunk}` events (every
    delta carries the role; each choice's last, with empty content, its finish_reason), an optional usage
    chunk (`stream_options.include_usage`), then `data: [DONE]`. With the server's `--reasoning-parser`,
    `<think>` text comes as `reasoning_content`; with `--tool-call-parser` and `tools`, calls come as
    `tool_calls` (streamed: the name first, then argument fragments) and finish_reason `tool_calls`.
    """
    body = await read_body(ChatCompletionRequest)
    state = server_state()
    state.require_model(body.model)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    run = await start_chat(body, completion_id)
    header = {"id": completion_id, "created": int(time.time()), "model": body.model}
    if body.stream:
        return sse_response(_chunks(state.engine_client, run, header, body.include_usage, state.engine.tokenizer))
    outputs = await run_whole(state.engine_client, run)
    tokenizer = state.engine.tokenizer
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=out.content, reasoning_content=out.reasoning,
                                     tool_calls=[_tool_call(c) for c in out.calls] or None),
            logprobs=None if out.logprobs is None else chat_logprobs(tokenizer, out.logprobs),
            finish_reason=out.finish_reason,
        )
        for i, out in enumerate(outputs)
    ]  # fmt: skip
    completion_tokens = sum(out.completion_tokens for out in outputs)
    cached_tokens = cached_prompt_tokens([out.cached_tokens for out in outputs], len(outputs))
    reasoning = [out.reasoning_tokens for out in outputs]
    usage = Usage.of(run.prompt_tokens, completion_tokens, cached_tokens,
                     None if None in reasoning else sum(reasoning))
    return ChatCompletionResponse(**header, choices=choices, usage=usage).model_dump()


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_call(call: ToolCall) -> ResponseToolCall:
    return ResponseToolCall(id=_call_id(), function=ResponseFunctionCall(name=call.name, arguments=call.arguments))


def _call_delta(event: OutputEvent, call_ids: list[str]) -> ChatDelta:
    """A tool call's start (`call`: its id and name) or a fragment of its arguments."""
    if event.kind == "call":
        call_ids.append(_call_id())
        return ChatDelta(tool_calls=[ToolCallDelta(index=event.index, id=call_ids[event.index], type="function",
                                                   function={"name": event.text, "arguments": ""})])  # fmt: skip
    return ChatDelta(tool_calls=[ToolCallDelta(index=event.index, function={"arguments": event.text})])


async def _chunks(
    client: AsyncEngineClient, run: ChatRun, header: dict[str, Any], include_usage: bool, tokenizer: Tokenizer
) -> AsyncGenerator[dict[str, Any] | bytes, None]:
    # OpenAI sends `"usage": null` on every chunk only when usage was asked for.
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
        return ChatCompletionChunk(**header, choices=choices, usage=usage).model_dump(exclude=exclude)

    text_events = {  # the chunks of nearly every token, pre-encoded
        "content": TextEvents(lambda i, text: chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=text))])),
        "reasoning": TextEvents(
            lambda i, text: chunk([ChatChunkChoice(index=i, delta=ChatDelta(reasoning_content=text))])
        ),
    }

    choices = len(run.requests)
    for index in range(choices):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=""))])
    completion_tokens = [0] * choices
    cached_tokens = [0] * choices
    reasoning_tokens: list[int | None] = [None] * choices
    call_ids: list[list[str]] = [[] for _ in range(choices)]
    async with aclosing(run_streamed(client, run)) as pieces:
        async for piece in pieces:
            index, event = piece.index, piece.event
            completion_tokens[index], cached_tokens[index] = piece.completion_tokens, piece.cached_tokens
            if event is None:
                reasoning_tokens[index] = piece.reasoning_tokens
                yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=""),
                                             finish_reason=piece.finish_reason)])  # fmt: skip
            elif piece.logprobs is not None:  # not pre-encoded: the chunk carries the tokens' logprobs
                delta = (ChatDelta(**{"reasoning_content" if event.kind == "reasoning" else "content": event.text})
                         if event.kind in text_events else _call_delta(event, call_ids[index]))
                yield chunk([ChatChunkChoice(index=index, delta=delta,
                                             logprobs=chat_logprobs(tokenizer, piece.logprobs))])
            elif event.kind in text_events:
                yield text_events[event.kind](index, event.text)
            else:
                yield chunk([ChatChunkChoice(index=index, delta=_call_delta(event, call_ids[index]))])
    if include_usage:
        cached = cached_prompt_tokens(cached_tokens, choices)  # one prompt, all its choices
        reasoning = None if None in reasoning_tokens else sum(reasoning_tokens)
        yield chunk([], Usage.of(run.prompt_tokens, sum(completion_tokens), cached, reasoning))
