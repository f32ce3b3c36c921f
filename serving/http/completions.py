"""POST /v1/completions: raw prompts (no chat template), `n` choices for each."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.http.body import read_body
from serving.http.choices import cached_prompt_tokens, fan_out, generate
from serving.http.engine_client import AsyncEngineClient, ChoiceResult, collect
from serving.http.errors import APIError
from serving.http.guided import compile_guide, guide_spec
from serving.http.logprobs import completion_logprobs, cumulative_logprob, prompt_texts
from serving.http.openapi import document_errors, streams
from serving.http.params import fit_context_length, generation_config, prompt_too_long
from serving.http.prompts import completion_prompt_chars, completion_prompt_ids
from serving.http.protocol import (
    MAX_N,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from serving.http.sse import TextEvents, sse_response
from serving.http.state import server_state
from serving.request import EngineRequest, TokenLogprob
from serving.text.tokenizer import PromptTooLong, Tokenizer

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
    n, best_of = _choice_counts(body)
    state.require_ready()
    engine = state.engine
    prepare = functools.partial(completion_prompt_ids, engine.tokenizer, body.prompt, engine.max_session_len - 1)
    try:
        prompts = await state.prepare_prompt(completion_prompt_chars(body.prompt), prepare)
    except PromptTooLong as error:
        raise prompt_too_long(error, engine.max_session_len, "prompt") from None
    if len(prompts) * best_of > MAX_N:
        raise APIError(400, f"at most {MAX_N} choices per request (prompts × {'best_of' if best_of > n else 'n'})",
                       param="best_of" if best_of > n else "n")
    config = generation_config(body, state.generation_defaults, engine.tokenizer)
    if body.logprobs is not None:
        config.logprobs = body.logprobs
        if body.echo:
            config.prompt_logprobs = body.logprobs
    elif best_of > n:
        config.logprobs = 0  # best_of ranks by them
    config.max_new_tokens = fit_context_length(
        prompts, config.max_new_tokens, engine.max_session_len, "prompt", state.settings.strict_context_length
    )
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    guide = await compile_guide(state.guides, guide_spec(body, engine.tokenizer), config, engine.eos_token_ids)
    requests = fan_out(engine, prompts, config, best_of, completion_id, state.settings.max_log_len, guide=guide)
    header = {"id": completion_id, "created": int(time.time()), "model": body.model}
    prompt_tokens = sum(len(p) for p in prompts)
    echo = Echo(engine.tokenizer, bool(body.echo), body.logprobs is not None)
    if body.stream:
        return sse_response(_chunks(state.engine_client, requests, header, prompt_tokens, body.include_usage, n, echo))
    results = await collect(generate(state.engine_client, requests), len(requests))
    completion_tokens = sum(r.num_completion_tokens for r in results)  # best_of's discarded choices count too
    cached_tokens = cached_prompt_tokens([r.num_cached_tokens for r in results], best_of)
    kept = [(r, request) for group in _best(results, requests, best_of, n) for r, request in group]
    return CompletionResponse(
        **header,
        choices=[CompletionChoice(index=i, text=echo.prompt_text(request) + r.text, finish_reason=r.finish_reason,
                                  logprobs=echo.logprobs(request, r.prompt_logprobs, r.logprobs, r.token_texts))
                 for i, (r, request) in enumerate(kept)],
        usage=Usage.of(prompt_tokens, completion_tokens, cached_tokens),
    ).model_dump()


def _choice_counts(body: CompletionRequest) -> tuple[int, int]:
    """`n`, and how many choices run per prompt (`best_of`); 400 for what cannot be served."""
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    n = body.n or 1
    best_of = body.best_of or n
    if best_of < n:
        raise APIError(400, f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if best_of > n and body.stream:
        raise APIError(400, "best_of greater than n cannot be streamed", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens may be 0 only with echo (to score the prompt)", param="max_tokens")
    return n, best_of


def _best(results: list[ChoiceResult], requests: list[EngineRequest], best_of: int,
          n: int) -> list[list[tuple[ChoiceResult, EngineRequest]]]:
    """Per prompt, its `n` choices of the highest cumulative log probability (all of them when best_of == n),
    in their original order."""
    groups = []
    for start in range(0, len(results), best_of):
        group = list(zip(results[start : start + best_of], requests[start : start + best_of], strict=True))
        if best_of > n:
            best = sorted(range(best_of), key=lambda i: -cumulative_logprob(group[i][0].logprobs))[:n]
            group = [group[i] for i in sorted(best)]
        groups.append(group)
    return groups


@dataclass(frozen=True)
class Echo:
    """What a completion choice shows of its prompt (`echo`) and its log probabilities (`logprobs`)."""

    tokenizer: Tokenizer
    echo: bool
    with_logprobs: bool

    def prompt_text(self, request: EngineRequest) -> str:
        return "".join(self._prompt_texts(request)) if self.echo else ""

    def _prompt_texts(self, request: EngineRequest) -> list[str]:
        return prompt_texts(self.tokenizer, request.prompt_token_ids)

    def logprobs(self, request: EngineRequest, prompt: list[TokenLogprob], output: list[TokenLogprob],
                 texts: list[str], offset: int | None = None) -> CompletionLogprobs | None:
        """The choice's `logprobs` (None when not asked for): the echoed prompt's (its first token's null),
        then the completion's, offsets into the text that `prompt_text` + the completion make. With
        `offset`: only the completion tokens given, the first of which starts there (a stream chunk)."""
        if not self.with_logprobs:
            return None
        if offset is not None or not self.echo:
            return completion_logprobs(self.tokenizer, output, texts, offset or 0)
        prompt_texts_ = self._prompt_texts(request)
        entries = [None, *prompt] + list(output)
        return completion_logprobs(self.tokenizer, entries, prompt_texts_ + list(texts),
                                   first_token_id=request.prompt_token_ids[0])


async def _chunks(
    client: AsyncEngineClient,
    requests: Sequence[EngineRequest],
    header: dict[str, Any],
    prompt_tokens: int,
    include_usage: bool,
    n: int,
    echo: Echo,
) -> AsyncGenerator[dict[str, Any] | bytes, None]:
    exclude = None if include_usage else {"usage"}

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> dict[str, Any]:
        return CompletionResponse(**header, choices=choices, usage=usage).model_dump(exclude=exclude)

    text_events = TextEvents(lambda index, text: chunk([CompletionChoice(index=index, text=text, finish_reason=None)]))
    completion_tokens = [0] * len(requests)
    cached_tokens = [0] * len(requests)
    # An echoed prompt goes out as each choice's first chunk, once its log probabilities are all in.
    prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in requests]
    echoed = [not echo.echo] * len(requests)
    offsets = [0] * len(requests)  # where each choice's next token's text starts in its whole text
    async with aclosing(generate(client, requests)) as deltas:
        async for index, delta in deltas:
            completion_tokens[index] = delta.num_completion_tokens
            cached_tokens[index] = delta.num_cached_tokens
            prompt_logprobs[index] += delta.prompt_logprobs or []
            request = requests[index]
            if not echoed[index] and (delta.token_ids or delta.finished):
                echoed[index] = True
                logprobs = echo.logprobs(request, prompt_logprobs[index], [], [])
                text = echo.prompt_text(request)
                offsets[index] = len(text)
                yield chunk([CompletionChoice(index=index, text=text, finish_reason=None, logprobs=logprobs)])
            if delta.logprobs:  # the chunk carries its tokens' log probabilities
                logprobs = echo.logprobs(request, [], delta.logprobs, delta.token_texts, offsets[index])
                offsets[index] += sum(len(text) for text in delta.token_texts)
                yield chunk([CompletionChoice(index=index, text=delta.text, finish_reason=None, logprobs=logprobs)])
            elif delta.text:
                yield text_events(index, delta.text)
            if delta.finished:  # in a chunk of its own, as chat's and /generate's streams end a choice
                yield chunk([CompletionChoice(index=index, text="", finish_reason=delta.finish_reason)])
    if include_usage:
        yield chunk([], Usage.of(prompt_tokens, sum(completion_tokens), cached_prompt_tokens(cached_tokens, n)))
