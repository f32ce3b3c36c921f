"""One HTTP request's choices on their way through the engine, with what HTTP adds around the engine client:
validation before anything runs, admission (503 with `Retry-After` when the server is full), the
request's deadline (`--request-timeout`), metrics and the access log's fields.

`fan_out` validates every choice up front (so a bad option is a 400 before a stream starts) and claims
one admission slot per choice; `generate` waits for the request's turn, then streams the choices' text
from `AsyncEngineClient.generate`, and accounts for them however they end. The HTTP request being served
(`serving.http.exchange.current_exchange()`) supplies the admission queue, the deadline and the metrics;
without one (a direct call) there is no admission, deadline or metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from serving.engine.client import EngineClient
from serving.http.engine_client import AsyncEngineClient
from serving.http.errors import APIError
from serving.http.exchange import Exchange, current_exchange
from serving.request import MAX_SEED, EngineRequest, GenerationConfig, Guide
from serving.text.output import TextDelta

logger = logging.getLogger(__name__)


def fan_out(
    engine: EngineClient,
    prompts: Sequence[list[int]],
    config: GenerationConfig,
    n: int,
    request_id: str,
    max_log_len: int | None = None,
    session_id: str | None = None,
    guide: Guide | None = None,
) -> list[EngineRequest]:
    """One engine request per choice: prompt p's choice i has index p*n+i and, with a seed, seed+index.
    `session_id` makes them turns of that interactive session (see `Engine.make_request`); `guide`
    constrains every choice (`serving.http.guided`).

    Raises the engine's InvalidRequestError before anything is submitted, and APIError 400/503 if
    admission refuses the choices.
    """
    requests = []
    for p, prompt_ids in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            choice_config = config
            if config.random_seed is not None:
                choice_config = dataclasses.replace(config, random_seed=(config.random_seed + index) % (MAX_SEED + 1))
            request = engine.make_request(prompt_ids, choice_config, f"{request_id}-{index}", session_id)
            request.guide = guide
            requests.append(request)
    exchange = current_exchange()
    if exchange is not None:
        exchange.admit(len(requests))
        exchange.prompt_tokens = sum(len(p) for p in prompts)
        max_new_tokens = config.max_new_tokens
        exchange.metrics.observe_request(n, engine.max_session_len if max_new_tokens is None else max_new_tokens)
    if logger.isEnabledFor(logging.INFO):
        for p, prompt_ids in enumerate(prompts):
            text = engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            record = {
                "request_id": exchange.request_id if exchange is not None else None,
                "completion_id": request_id,
                "prompt_index": p,
                "prompt_tokens": len(prompt_ids),
                "n": n,
                "options": dataclasses.asdict(config),
                "prompt": text if max_log_len is None else text[:max_log_len],
            }
            logger.info("prompt %s", json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    return requests


@dataclass(eq=False)
class _ChoiceRecord:
    """What the metrics need of a choice when it ends."""

    request: EngineRequest
    first_token: float | None = None
    last_token: float | None = None
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


async def generate(client: AsyncEngineClient,
                   requests: Sequence[EngineRequest]) -> AsyncGenerator[tuple[int, TextDelta], None]:
    """`AsyncEngineClient.generate` for the HTTP request being served: first its admission ticket (503
    when it waited past its deadline or first-token deadline for a slot), then the choices' text until
    its deadlines (503 without a first token in time, 408 after the request timeout)."""
    exchange = current_exchange()
    loop = client.loop
    arrival = exchange.started if exchange is not None else loop.time()
    deadline = exchange.deadline if exchange is not None else None
    first_token_deadline = exchange.first_token_deadline if exchange is not None else None
    ticket = exchange.ticket if exchange is not None else None
    records = [_ChoiceRecord(r) for r in requests]
    failure: APIError | None = None
    try:
        if ticket is not None:
            await ticket.wait(min((d for d in (deadline, first_token_deadline) if d is not None), default=None))
        async with aclosing(client.generate(requests, deadline, first_token_deadline)) as deltas:
            async for index, delta in deltas:
                record = records[index]
                if delta.token_times is not None:
                    first_at, record.last_token = delta.token_times
                    record.first_token = record.first_token or first_at
                record.cached_tokens = max(record.cached_tokens, delta.num_cached_tokens)
                record.completion_tokens = delta.num_completion_tokens
                if delta.finished:
                    record.finish_reason = delta.finish_reason
                yield index, delta
    except APIError as error:
        failure = error
        raise
    finally:
        if ticket is not None:
            ticket.release()
        if exchange is not None:
            _account(exchange, records, arrival, failure)


def _account(exchange: Exchange, choices: list[_ChoiceRecord], arrival: float, failure: APIError | None) -> None:
    """Metrics and access-log fields for the choices of a request that has ended, however it ended."""
    exchange.completion_tokens = sum(c.completion_tokens for c in choices)
    # A choice that never finished was cut short: by an error or timeout, else by the client going away.
    cut_short = (failure.code or "error") if failure is not None else "abort"
    exchange.finish_reasons = [c.finish_reason or cut_short for c in choices]
    metrics = exchange.metrics
    if failure is not None:
        if failure.status == 503 and failure.code == "queue_timeout":
            metrics.reject(failure.code)
        else:
            metrics.fail(failure.code or "error")
    for choice in choices:
        if choice.finish_reason is None and failure is not None:
            continue  # counted once above, as the request's failure
        metrics.observe_choice(
            finish_reason=choice.finish_reason or "abort",
            prompt_tokens=len(choice.request.prompt_token_ids),
            cached_tokens=choice.cached_tokens,
            generated_tokens=choice.completion_tokens,
            arrival=arrival,
            first_token=choice.first_token,
            last_token=choice.last_token,
        )



def cached_prompt_tokens(cached: Sequence[int], n: int) -> int:
    """A request's `usage.prompt_tokens_details.cached_tokens` from its choices' counts (`fan_out`'s
    order): usage counts each prompt once, so each prompt counts the tokens all its choices reused."""
    return sum(min(cached[p : p + n]) for p in range(0, len(cached), n))
