"""The one bridge between the asyncio handlers and the engine thread.

`fan_out` validates every choice of an HTTP request up front (so a bad option is a 400 before a
stream starts and before anything runs), then claims one admission slot per choice (503 with
`Retry-After` when the server is full); `generate` waits for the request's turn, submits its choices
and yields each choice's text as the engine produces it. The engine calls each request's sink on its
own thread; the sinks buffer the outputs and the engine's step listener wakes the event loop once per
step to deliver them (`_OutputRelay`). Whatever ends
the iteration (the last choice finishing, a client disconnect cancelling the handler, the request
timeout, an error), every request still running is aborted, so the engine frees its pages at once,
and the admission slots are given back.

The HTTP request being served (`serving.http.exchange.current_exchange()`) supplies the admission
queue, the deadline (`--request-timeout`) and the metrics; without one (a direct call) there is no
admission, deadline or metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from serving.engine.process import AnyEngine
from serving.engine.request import MAX_SEED, EngineOutput, EngineRequest, FinishReason, GenerationConfig
from serving.http.errors import APIError
from serving.http.exchange import Exchange, current_exchange
from serving.text.output import OutputProcessor, TextDelta

logger = logging.getLogger(__name__)


def fan_out(
    engine: AnyEngine,
    prompts: Sequence[list[int]],
    config: GenerationConfig,
    n: int,
    request_id: str,
    max_log_len: int | None = None,
    session_id: str | None = None,
) -> list[EngineRequest]:
    """One engine request per choice: prompt p's choice i has index p*n+i and, with a seed, seed+index.
    `session_id` makes them turns of that interactive session (see `Engine.make_request`).

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
            requests.append(engine.make_request(prompt_ids, choice_config, f"{request_id}-{index}", session_id))
    exchange = current_exchange()
    if exchange is not None:
        exchange.admit(len(requests))
        exchange.prompt_tokens = sum(len(p) for p in prompts)
        exchange.metrics.observe_request(n, config.max_new_tokens or engine.max_session_len)
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


@dataclass
class ChoiceResult:
    """A finished choice, for answers that are not streamed."""

    text: str = ""
    finish_reason: str | None = None
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass(eq=False)
class _Choice:
    """A choice in flight, with what the metrics need when it ends."""

    request: EngineRequest
    processor: OutputProcessor
    first_token: float | None = None
    last_token: float | None = None
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class _OutputRelay:
    """Carries engine outputs to one event loop, waking it once per engine step.

    A sink that called `call_soon_threadsafe` for every output made the engine thread write to the
    loop's wake-up socket once per token, and each write let the busy event loop take the GIL, often
    for a whole switch interval (5 ms): at a few hundred sequences a step that stalled the engine far
    longer than the step itself, and tokens reached clients in bursts. Sinks only append here; the
    engine calls `flush` after each step, which wakes the loop once to hand everything over.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: deque[tuple[asyncio.Queue[tuple[int, EngineOutput]], tuple[int, EngineOutput]]] = deque()
        self._lock = threading.Lock()
        self._woken = False  # a `_deliver` is scheduled and has not started yet

    def sink(self, queue: asyncio.Queue[tuple[int, EngineOutput]], index: int) -> Callable[[EngineOutput], None]:
        def sink(output: EngineOutput) -> None:  # engine thread
            self._pending.append((queue, (index, output)))

        return sink

    def flush(self) -> None:  # engine thread
        with self._lock:
            if self._woken or not self._pending:
                return
            self._woken = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed: the server is gone and nobody waits
            pass

    def _deliver(self) -> None:  # event loop
        with self._lock:
            self._woken = False  # outputs appended from now on get a wake-up of their own
        while self._pending:
            queue, item = self._pending.popleft()
            queue.put_nowait(item)


# One relay per engine and event loop (tests run several servers, each with its own loop).
_relays: weakref.WeakKeyDictionary[AnyEngine, dict[asyncio.AbstractEventLoop, _OutputRelay]] = (
    weakref.WeakKeyDictionary())


def _relay(engine: AnyEngine, loop: asyncio.AbstractEventLoop) -> _OutputRelay:
    relays = _relays.setdefault(engine, {})
    relay = relays.get(loop)
    if relay is None:
        for closed in [other for other in relays if other.is_closed()]:
            engine.step_listeners.remove(relays.pop(closed).flush)
        relay = relays[loop] = _OutputRelay(loop)
        engine.step_listeners.append(relay.flush)
    return relay


def request_timeout_error() -> APIError:
    # x-should-retry: the openai SDK would otherwise retry a 408, which would only time out again.
    return APIError(
        408,
        "the request did not finish within the server's request timeout (--request-timeout)",
        code="request_timeout",
        headers={"x-should-retry": "false"},
    )


async def generate(engine: AnyEngine, requests: Sequence[EngineRequest]) -> AsyncGenerator[tuple[int, TextDelta], None]:
    """Yield `(choice index, TextDelta)` for every increment of every request, interleaved as produced.

    Raises APIError 503 if the engine is not running, ends a request on its own (shutdown) or the
    request waited past its deadline for a slot; 408 past the deadline while generating; 500 if the
    engine fails a request.
    """
    loop = asyncio.get_running_loop()
    exchange = current_exchange()
    arrival = exchange.started if exchange is not None else loop.time()
    deadline = exchange.deadline if exchange is not None else None
    ticket = exchange.ticket if exchange is not None else None
    outputs: asyncio.Queue[tuple[int, EngineOutput]] = asyncio.Queue()
    relay = _relay(engine, loop)
    choices = [_Choice(r, OutputProcessor(engine.tokenizer, r.prompt_token_ids, r.config)) for r in requests]
    pending: dict[int, _Choice] = {}
    failure: APIError | None = None
    try:
        if ticket is not None:
            await ticket.wait(deadline)
        for index, choice in enumerate(choices):
            pending[index] = choice
            try:
                engine.submit(choice.request, relay.sink(outputs, index))
            except RuntimeError as error:
                raise APIError(503, f"the engine is not running: {error}", code="engine_stopped") from error
        while pending:
            first = await _next_output(outputs, deadline, loop)
            for index, output in _with_queued(outputs, first):
                choice = pending.get(index)
                if choice is None:
                    continue  # the abort echo of a choice a stop string already ended
                if output.error is not None or output.finish_reason is FinishReason.ERROR:
                    raise APIError(
                        500,
                        f"the engine failed request {choice.request.request_id}: {output.error}",
                        code="engine_error",
                    )
                if output.finish_reason is FinishReason.ABORT:
                    raise APIError(503, "the server is shutting down; the request was aborted", code="aborted")
                if output.new_token_ids:
                    choice.last_token = loop.time()
                    choice.first_token = choice.first_token or choice.last_token
                choice.cached_tokens = max(choice.cached_tokens, output.num_cached_tokens)
                delta = choice.processor.process(output)
                choice.completion_tokens = delta.num_completion_tokens
                if delta.finished:
                    del pending[index]
                    choice.finish_reason = delta.finish_reason
                    if not output.finished:  # a stop string ended it: the engine still runs it
                        engine.abort(choice.request.request_id)
                yield index, delta
    except APIError as error:
        failure = error
        raise
    finally:
        for choice in pending.values():
            engine.abort(choice.request.request_id)
        if ticket is not None:
            ticket.release()
        if exchange is not None:
            _account(exchange, choices, arrival, failure)


async def _next_output(
    outputs: asyncio.Queue[tuple[int, EngineOutput]], deadline: float | None, loop: asyncio.AbstractEventLoop
) -> tuple[int, EngineOutput]:
    # The timeout covers only this wait, never a `yield`: a timeout scope left open across a yield
    # would fire in whatever the consumer is awaiting (e.g. a slow client's socket) instead of here.
    if deadline is None:
        return await outputs.get()
    if loop.time() >= deadline:
        raise request_timeout_error()
    try:
        async with asyncio.timeout_at(deadline):
            return await outputs.get()
    except TimeoutError:
        raise request_timeout_error() from None


def _with_queued(
    outputs: asyncio.Queue[tuple[int, EngineOutput]], first: tuple[int, EngineOutput]
) -> list[tuple[int, EngineOutput]]:
    """`first` and every output already queued behind it, a choice's consecutive outputs merged into one.

    When the loop falls behind the engine (a few hundred streams), a choice has several steps' tokens
    waiting: handing them on as one delta makes one SSE chunk and one socket write instead of several,
    so the cost per token falls just when the load is highest. Whatever follows a choice's final
    output can only be the engine's answer to an abort, which `generate` would skip anyway.
    """
    merged = dict([first])
    while not outputs.empty():
        index, output = outputs.get_nowait()
        earlier = merged.get(index)
        if earlier is None:
            merged[index] = output
        elif not earlier.finished:
            merged[index] = dataclasses.replace(
                output,
                new_token_ids=earlier.new_token_ids + output.new_token_ids,
                num_cached_tokens=max(earlier.num_cached_tokens, output.num_cached_tokens),
            )
    return list(merged.items())


def _account(exchange: Exchange, choices: list[_Choice], arrival: float, failure: APIError | None) -> None:
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


async def collect(engine: AnyEngine, requests: Sequence[EngineRequest]) -> list[ChoiceResult]:
    """Run the requests to the end; results in choice order."""
    results = [ChoiceResult() for _ in requests]
    async with aclosing(generate(engine, requests)) as deltas:
        async for index, delta in deltas:
            result = results[index]
            result.text += delta.text
            result.num_completion_tokens = delta.num_completion_tokens
            result.num_cached_tokens = delta.num_cached_tokens
            if delta.finished:
                result.finish_reason = delta.finish_reason
    return results


def cached_prompt_tokens(cached: Sequence[int], n: int) -> int:
    """A request's `usage.prompt_tokens_details.cached_tokens` from its choices' counts (`fan_out`'s
    order): usage counts each prompt once, so each prompt counts the tokens all its choices reused."""
    return sum(min(cached[p : p + n]) for p in range(0, len(cached), n))
