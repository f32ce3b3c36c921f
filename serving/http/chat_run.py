"""A chat request's run, shared by every route that speaks chat (OpenAI's chat completions, its Responses
API, Anthropic's Messages API): the request becomes a `ChatCompletionRequest`, and from there one path
renders the template, plans the tools, fixes the generation config and claims the choices
(`start_chat`), then reads each choice's text back as reasoning, content and tool calls, whole
(`run_whole`) or as it streams (`run_streamed`). The routes differ only in the shapes they answer.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from serving.http.choices import fan_out, generate
from serving.http.engine_client import AsyncEngineClient, collect
from serving.http.errors import APIError
from serving.http.guided import compile_guide, guide_spec
from serving.http.params import fit_context_length, generation_config, prompt_too_long
from serving.http.prompts import ChatPrompt, chat_prompt, messages_chars
from serving.http.protocol import ChatCompletionRequest
from serving.http.state import server_state
from serving.http.tools import ToolPlan, plan_tools
from serving.request import EngineRequest, TokenLogprob
from serving.text.chat_output import ChatOutputParser, OutputEvent, collect_text
from serving.text.reasoning import ReasoningParser, starts_in_reasoning
from serving.text.tokenizer import PromptTooLong
from serving.text.tool_parsers import ToolCall


@dataclass(frozen=True)
class ChatRun:
    """A chat request admitted to run: its choices' engine requests and how to read their text."""

    requests: list[EngineRequest]
    prompt_tokens: int
    plan: ToolPlan
    in_reasoning: bool | None  # None: no reasoning parser
    think_ids: tuple[int | None, int | None] = (None, None)  # the ids of `<think>` and `</think>`, if tokens

    def reasoning_tokens(self, token_ids: list[int]) -> int | None:
        """How many of a choice's tokens are its reasoning (through `</think>`); None without a parser."""
        if self.in_reasoning is None:
            return None
        start, end = self.think_ids
        if end is not None and end in token_ids:
            return token_ids.index(end) + 1
        reasoning = self.in_reasoning or (start is not None and token_ids[:1] == [start])
        return len(token_ids) if reasoning else 0
    def output_parser(self) -> ChatOutputParser:
        reasoning = ReasoningParser(self.in_reasoning) if self.in_reasoning is not None else None
        return ChatOutputParser(reasoning, self.plan.format, self.plan.call_prefix, self.plan.max_calls)


async def render_chat(body: ChatCompletionRequest) -> tuple[ChatPrompt, ToolPlan]:
    """The prompt the chat template makes of the request, with its tools planned."""
    state = server_state()
    state.require_ready()
    plan = plan_tools(body, state.settings.tool_call_parser)
    engine = state.engine
    prepare = functools.partial(chat_prompt, engine.tokenizer, body.messages, body.chat_template_kwargs,
                                state.settings.chat_template, plan.tools, plan.call_prefix, engine.max_session_len - 1)
    try:
        prompt = await state.prepare_prompt(messages_chars(body.messages), prepare)
    except PromptTooLong as error:
        raise prompt_too_long(error, engine.max_session_len, "messages") from None
    return prompt, plan


async def start_chat(body: ChatCompletionRequest, request_id: str) -> ChatRun:
    """Template, tools, generation config, context length and admission: 4xx before anything runs."""
    prompt, plan = await render_chat(body)
    state = server_state()
    engine = state.engine
    settings = state.settings
    config = generation_config(body, state.generation_defaults, engine.tokenizer)
    if body.logprobs:
        config.logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if not config.ignore_eos:  # the template's end of turn ends the answer like an EOS
        stops = set(config.stop_token_ids or []) | state.turn_end_ids
        config.stop_token_ids = sorted(stops) or None
    if plan.format is not None and plan.format.special_tokens:
        config.skip_special_tokens = False  # the call tags are special tokens
    in_reasoning: bool | None = None
    if settings.reasoning_parser is not None and not plan.call_prefix:
        enable_thinking = (body.chat_template_kwargs or {}).get("enable_thinking")
        in_reasoning = starts_in_reasoning(settings.reasoning_parser, prompt.text, enable_thinking)
    prompt_ids = prompt.token_ids
    config.max_new_tokens = fit_context_length(
        [prompt_ids], config.max_new_tokens, engine.max_session_len, "messages", settings.strict_context_length
    )
    guide = await compile_guide(state.guides, guide_spec(body, engine.tokenizer, plan), config, engine.eos_token_ids)
    requests = fan_out(engine, [prompt_ids], config, body.n or 1, request_id, settings.max_log_len, guide=guide)
    think_ids = (engine.tokenizer.token_id("<think>"), engine.tokenizer.token_id("</think>"))
    return ChatRun(requests, len(prompt_ids), plan, in_reasoning, think_ids)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """`tool_calls` when the model stopped after calling; a length cut stays `length`."""
    return "tool_calls" if called and reason == "stop" else reason


@dataclass(frozen=True)
class ChoiceOutput:
    content: str | None
    reasoning: str | None
    calls: list[ToolCall]
    finish_reason: str | None  # `finish_reason`'s
    completion_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] | None  # when asked for
    reasoning_tokens: int | None


async def run_whole(client: AsyncEngineClient, run: ChatRun) -> list[ChoiceOutput]:
    results = await collect(generate(client, run.requests), len(run.requests))
    outputs = []
    for result in results:
        parser = run.output_parser()
        events = parser.feed(result.text) + parser.finish()
        run.plan.check(parser.calls, bool(events) and events[0].kind == "call")
        content, reasoning = collect_text(events)
        reason = finish_reason(result.finish_reason, bool(parser.calls))
        logprobs = result.logprobs if result_wants_logprobs(run) else None
        outputs.append(ChoiceOutput(content, reasoning, parser.calls, reason, result.num_completion_tokens,
                                    result.num_cached_tokens, logprobs,
                                    run.reasoning_tokens(result.token_ids)))  # fmt: skip
    return outputs


def result_wants_logprobs(run: ChatRun) -> bool:
    return run.requests[0].config.logprobs is not None


@dataclass(frozen=True)
class ChoiceEvent:
    """A piece of one choice's answer (`event`), or its end (`finish_reason` set, `event` None), with the
    choice's running counts. `logprobs` (when asked for) are those of the tokens that produced this
    piece, on the first piece they produced (a piece of no text when their text is still held back)."""

    index: int
    event: OutputEvent | None
    finish_reason: str | None
    completion_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] | None = None
    reasoning_tokens: int | None = None


async def run_streamed(client: AsyncEngineClient, run: ChatRun) -> AsyncGenerator[ChoiceEvent, None]:
    """The choices' pieces as they are generated; an enforced tool choice is checked as soon as it can fail."""
    parsers = [run.output_parser() for _ in run.requests]
    first_kind: list[str | None] = [None] * len(run.requests)
    token_ids: list[list[int]] = [[] for _ in run.requests]
    async with aclosing(generate(client, run.requests)) as deltas:
        async for index, delta in deltas:
            parser = parsers[index]
            token_ids[index] += delta.token_ids
            counts = delta.num_completion_tokens, delta.num_cached_tokens
            logprobs = delta.logprobs or None  # handed on with the first piece these tokens make
            events = parser.feed(delta.text) + (parser.finish() if delta.finished else [])
            if logprobs and not events:
                events = [OutputEvent("content", "")]
            for event in events:
                first_kind[index] = first_kind[index] or (event.kind if event.text or event.kind == "call" else None)
                if run.plan.allowed is not None:  # enforced: the first thing out must be an allowed call
                    run.plan.check(parser.calls, first_kind[index] == "call")
                yield ChoiceEvent(index, event, None, *counts, logprobs)
                logprobs = None
            if delta.finished:
                run.plan.check(parser.calls, first_kind[index] == "call")
                yield ChoiceEvent(index, None, finish_reason(delta.finish_reason, bool(parser.calls)), *counts,
                                  reasoning_tokens=run.reasoning_tokens(token_ids[index]))
