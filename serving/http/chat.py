"""POST /v1/chat/completions: messages through the chat template, then one choice per `n`."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.http.body import read_body
from serving.http.choices import cached_prompt_tokens, fan_out, generate
from serving.http.engine_client import AsyncEngineClient, collect
from serving.http.errors import APIError
from serving.http.openapi import streams
from serving.http.params import check_context_length, generation_config, prompt_too_long
from serving.http.prompts import chat_prompt, messages_chars
from serving.http.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ErrorResponse,
    ResponseFunctionCall,
    ResponseToolCall,
    ToolCallDelta,
    Usage,
)
from serving.http.sse import TextEvents, sse_response
from serving.http.state import server_state
from serving.http.tools import ToolPlan, plan_tools
from serving.request import EngineRequest
from serving.text.chat_output import ChatOutputParser, OutputEvent, collect_text
from serving.text.reasoning import ReasoningParser, starts_in_reasoning
from serving.text.tokenizer import PromptTooLong

blueprint = Blueprint("chat", __name__)


@blueprint.post("/v1/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletionResponse, 200)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 408)
@document_response(ErrorResponse, 413)
@document_response(ErrorResponse, 422)
@document_response(ErrorResponse, 500)
@document_response(ErrorResponse, 503)
@streams(ChatCompletionChunk)
async def chat_completions() -> Response | dict[str, Any]:
    """Create a chat completion.

    With `stream: true` the answer is `text/event-stream`: `data: {ChatCompletionChunk}` events (the
    first of each choice carries the role, the last its finish_reason), an optional usage chunk
    (`stream_options.include_usage`), then `data: [DONE]`. With the server's `--reasoning-parser`,
    `<think>` text comes as `reasoning_content`; with `--tool-call-parser` and `tools`, calls come as
    `tool_calls` (streamed: the name first, then argument fragments) and finish_reason `tool_calls`.
    """
    body = await read_body(ChatCompletionRequest)
    state = server_state()
    state.require_model(body.model)
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    state.require_ready()
    engine = state.engine
    settings = state.settings
    plan = plan_tools(body, settings.tool_call_parser)
    prepare = functools.partial(chat_prompt, engine.tokenizer, body.messages, body.chat_template_kwargs,
                                settings.chat_template, plan.tools, plan.call_prefix, engine.max_session_len - 1)
    try:
        prompt = await state.prepare_prompt(messages_chars(body.messages), prepare)
    except PromptTooLong as error:
        raise prompt_too_long(error, engine.max_session_len, "messages") from None
    config = generation_config(body, state.generation_defaults)
    if not config.ignore_eos:  # the template's end of turn ends the answer like an EOS
        stops = set(config.stop_token_ids or []) | state.turn_end_ids
        config.stop_token_ids = sorted(stops) or None
    if plan.format is not None and plan.format.special_tokens:
        config.skip_special_tokens = False  # the call tags are special tokens
    in_reasoning: bool | None = None  # None: no reasoning parser
    if settings.reasoning_parser is not None and not plan.call_prefix:
        enable_thinking = (body.chat_template_kwargs or {}).get("enable_thinking")
        in_reasoning = starts_in_reasoning(settings.reasoning_parser, prompt.text, enable_thinking)

    def output_parser() -> ChatOutputParser:
        reasoning = ReasoningParser(in_reasoning) if in_reasoning is not None else None
        return ChatOutputParser(reasoning, plan.format, plan.call_prefix, plan.max_calls)

    prompt_ids = prompt.token_ids
    check_context_length([prompt_ids], config.max_new_tokens, engine.max_session_len, "messages")
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = fan_out(engine, [prompt_ids], config, body.n or 1, completion_id, settings.max_log_len)
    header = {"id": completion_id, "created": int(time.time()), "model": body.model}
    if body.stream:
        return sse_response(_chunks(state.engine_client, requests, header, len(prompt_ids), body.include_usage,
                                    output_parser, plan))
    results = await collect(generate(state.engine_client, requests), len(requests))
    choices = []
    for i, result in enumerate(results):
        parser = output_parser()
        events = parser.feed(result.text) + parser.finish()
        plan.check(parser.calls, bool(events) and events[0].kind == "call")
        content, reasoning = collect_text(events)
        calls = [
            ResponseToolCall(id=_call_id(), function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
            for c in parser.calls
        ]
        choices.append(
            ChatChoice(
                index=i,
                message=AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=calls or None),
                finish_reason=_finish_reason(result.finish_reason, bool(calls)),
            )
        )
    completion_tokens = sum(r.num_completion_tokens for r in results)
    cached_tokens = cached_prompt_tokens([r.num_cached_tokens for r in results], len(results))
    return ChatCompletionResponse(
        **header, choices=choices, usage=Usage.of(len(prompt_ids), completion_tokens, cached_tokens)
    ).model_dump()


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """`tool_calls` when the model stopped after calling; a length cut stays `length`."""
    return "tool_calls" if called and reason == "stop" else reason


def _call_delta(event: OutputEvent, call_ids: list[str]) -> ChatDelta:
    """A tool call's start (`call`: its id and name) or a fragment of its arguments."""
    if event.kind == "call":
        call_ids.append(_call_id())
        return ChatDelta(tool_calls=[ToolCallDelta(index=event.index, id=call_ids[event.index], type="function",
                                                   function={"name": event.text, "arguments": ""})])  # fmt: skip
    return ChatDelta(tool_calls=[ToolCallDelta(index=event.index, function={"arguments": event.text})])


async def _chunks(
    client: AsyncEngineClient,
    requests: Sequence[EngineRequest],
    header: dict[str, Any],
    prompt_tokens: int,
    include_usage: bool,
    output_parser: Callable[[], ChatOutputParser],
    plan: ToolPlan,
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

    for index in range(len(requests)):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    completion_tokens = [0] * len(requests)
    cached_tokens = [0] * len(requests)
    parsers = [output_parser() for _ in requests]
    call_ids: list[list[str]] = [[] for _ in requests]
    first_kind: list[str | None] = [None] * len(requests)
    async with aclosing(generate(client, requests)) as deltas:
        async for index, delta in deltas:
            completion_tokens[index] = delta.num_completion_tokens
            cached_tokens[index] = delta.num_cached_tokens
            parser = parsers[index]
            events = parser.feed(delta.text) + (parser.finish() if delta.finished else [])
            for event in events:
                first_kind[index] = first_kind[index] or event.kind
                if plan.allowed is not None:  # enforced: the first thing out must be an allowed call
                    plan.check(parser.calls, first_kind[index] == "call")
                if event.kind in text_events:
                    yield text_events[event.kind](index, event.text)
                else:
                    yield chunk([ChatChunkChoice(index=index, delta=_call_delta(event, call_ids[index]))])
            if delta.finished:
                plan.check(parser.calls, first_kind[index] == "call")
                reason = _finish_reason(delta.finish_reason, bool(parser.calls))
                yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)])
    if include_usage:
        cached = cached_prompt_tokens(cached_tokens, len(requests))  # one prompt, all its choices
        yield chunk([], Usage.of(prompt_tokens, sum(completion_tokens), cached))
