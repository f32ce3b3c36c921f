"""The asyncio client of the engine: submit a request's choices and await their text as it is produced.

The engine calls each request's sink on its own thread (or its process's reader thread); the sinks
buffer the outputs, and the engine's step listener wakes this event loop once per step to deliver them
(`_OutputRelay`). Text comes from the shared `RequestTracker` (detokenize, stop strings), as in
`pipeline()`. Whatever ends the iteration (the last choice finishing, a client disconnect cancelling the
handler, the deadline, an error, `fail_all` when the engine is stuck), every request still running is
aborted, so the engine frees its pages at once. HTTP's own concerns (admission, metrics, the access
log) live in `choices`, around this.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing

from serving.engine.client import EngineClient
from serving.http.errors import APIError, unavailable
from serving.request import EngineOutput, EngineRequest, FinishReason, TokenLogprob
from serving.text.output import RequestFailed, RequestTracker, TextDelta


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


# Put in a generation's queue to wake it when `AsyncEngineClient.fail_all` has failed it.
_WAKE_UP: tuple[int, EngineOutput | None] = (-1, None)


def first_token_timeout_error() -> APIError:
    return unavailable(
        "no token was generated within the server's first-token timeout (--first-token-timeout); the server is "
        "overloaded or its engine is stuck",
        "first_token_timeout",
    )


def request_timeout_error() -> APIError:
    # x-should-retry: the openai SDK would otherwise retry a 408, which would only time out again.
    return APIError(
        408,
        "the request did not finish within the server's request timeout (--request-timeout)",
        code="request_timeout",
        headers={"x-should-retry": "false"},
    )


class AsyncEngineClient:
    """One engine, seen from one event loop (`ServerState.engine_client`)."""

    def __init__(self, engine: EngineClient, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self._relay = _OutputRelay(loop)
        engine.step_listeners.append(self._relay.flush)
        self._running: set[_Generation] = set()  # generations waiting on the engine

    @property
    def busy(self) -> bool:
        """Whether any request waits on the engine (so an engine that stands still is stuck, not idle)."""
        return bool(self._running)

    def fail_all(self, error: APIError) -> None:
        """End every generation waiting on the engine with `error` (each aborts its engine requests)."""
        for generation in self._running:
            generation.fail(error)

    def close(self) -> None:
        """Stop listening to the engine's steps (the event loop is going away)."""
        if self._relay.flush in self.engine.step_listeners:
            self.engine.step_listeners.remove(self._relay.flush)

    async def generate(self, requests: Sequence[EngineRequest], deadline: float | None = None,
                       first_token_deadline: float | None = None) -> AsyncGenerator[tuple[int, TextDelta], None]:
        """Yield `(choice index, TextDelta)` for every increment of every request, interleaved as produced.

        Raises APIError 503 (with Retry-After) if the engine is not running, gives no output before
        `first_token_deadline`, or is stuck (`fail_all`); 503 if it ends a request on its own (shutdown);
        408 past the deadline (event-loop times); 500 if the engine fails a request.
        """
        generation = _Generation()
        outputs = generation.outputs
        tracker = RequestTracker(self.engine.tokenizer, list(requests))
        submitted = 0
        self._running.add(generation)
        try:
            for index, request in enumerate(requests):
                try:
                    self.engine.submit(request, self._relay.sink(outputs, index))
                except RuntimeError as error:  # it stopped after the route checked it was ready
                    raise unavailable("the engine has stopped; see the server log", "engine_stopped") from error
                submitted += 1
            while tracker.pending:
                limit, timeout_error = deadline, request_timeout_error
                if not generation.produced and first_token_deadline is not None and (
                    deadline is None or first_token_deadline < deadline
                ):
                    limit, timeout_error = first_token_deadline, first_token_timeout_error
                first = await _next_output(outputs, limit, timeout_error, self.loop)
                if generation.failure is not None:
                    raise generation.failure
                generation.produced = True
                for index, output, since in _with_queued(outputs, first):
                    try:
                        delta, to_abort = tracker.process(index, output)
                    except RequestFailed as failed:
                        raise APIError(500, str(failed), code="engine_error") from None
                    if delta is None:
                        continue  # the abort echo of a choice a stop string already ended
                    if delta.token_ids:
                        delta.token_times = (since, output.produced_at)
                    if delta.finish_reason == FinishReason.ABORT:
                        raise APIError(503, "the server is shutting down; the request was aborted", code="aborted")
                    if to_abort is not None:
                        self.engine.abort(to_abort)
                    yield index, delta
        finally:
            self._running.discard(generation)
            for index in tracker.pending:
                if index < submitted:
                    self.engine.abort(requests[index].request_id)


@dataclasses.dataclass(eq=False)
class _Generation:
    """One `generate` call's outputs, and whether it has had any or been failed from outside."""

    outputs: asyncio.Queue[tuple[int, EngineOutput]] = dataclasses.field(default_factory=asyncio.Queue)
    produced: bool = False  # the engine has answered at least once
    failure: APIError | None = None

    def fail(self, error: APIError) -> None:
        if self.failure is None:
            self.failure = error
            self.outputs.put_nowait(_WAKE_UP)


async def _next_output(
    outputs: asyncio.Queue[tuple[int, EngineOutput]], deadline: float | None, timeout_error: Callable[[], APIError],
    loop: asyncio.AbstractEventLoop,
) -> tuple[int, EngineOutput]:
    # The timeout covers only this wait, never a `yield`: a timeout scope left open across a yield
    # would fire in whatever the consumer is awaiting (e.g. a slow client's socket) instead of here.
    if deadline is None:
        return await outputs.get()
    if loop.time() >= deadline:
        raise timeout_error()
    try:
        async with asyncio.timeout_at(deadline):
            return await outputs.get()
    except TimeoutError:
        raise timeout_error() from None


def _with_queued(
    outputs: asyncio.Queue[tuple[int, EngineOutput]], first: tuple[int, EngineOutput]
) -> list[tuple[int, EngineOutput, float]]:
    """`first` and every output already queued behind it, a choice's consecutive outputs merged into one,
    each with the `produced_at` of the first output merged into it (the merged one keeps the last's).

    When the loop falls behind the engine (a few hundred streams), a choice has several steps' tokens
    waiting: handing them on as one delta makes one SSE chunk and one socket write instead of several,
    so the cost per token falls just when the load is highest. Whatever follows a choice's final
    output can only be the engine's answer to an abort, which `generate` would skip anyway.
    """
    index, output = first
    merged = {index: (output, output.produced_at)}
    while not outputs.empty():
        index, output = outputs.get_nowait()
        if index < 0:
            continue  # a wake-up (`_Generation.fail`): the caller sees the failure on its next wait
        earlier, since = merged.get(index, (None, output.produced_at))
        if earlier is None:
            merged[index] = output, since
        elif not earlier.finished:
            merged[index] = dataclasses.replace(
                output,
                new_token_ids=earlier.new_token_ids + output.new_token_ids,
                num_cached_tokens=max(earlier.num_cached_tokens, output.num_cached_tokens),
                logprobs=_joined(earlier.logprobs, output.logprobs),
                prompt_logprobs=_joined(earlier.prompt_logprobs, output.prompt_logprobs),
            ), since if earlier.new_token_ids else output.produced_at
    return [(index, output, since) for index, (output, since) in merged.items()]


def _joined(first: list | None, second: list | None) -> list | None:
    return first if second is None else second if first is None else first + second


async def collect(deltas: AsyncGenerator[tuple[int, TextDelta], None], num_choices: int) -> list[ChoiceResult]:
    """Run a request's choices to the end; results in choice order."""
    results = [ChoiceResult() for _ in range(num_choices)]
    async with aclosing(deltas):
        async for index, delta in deltas:
            result = results[index]
            result.text += delta.text
            result.token_ids += delta.token_ids
            result.num_completion_tokens = delta.num_completion_tokens
            result.num_cached_tokens = delta.num_cached_tokens
            if delta.logprobs is not None:
                result.logprobs += delta.logprobs
                result.token_texts += delta.token_texts
            result.prompt_logprobs += delta.prompt_logprobs or []
            result.embedding = delta.embedding or result.embedding
            if delta.finished:
                result.finish_reason = delta.finish_reason
    return results


@dataclasses.dataclass
class ChoiceResult:
    """A finished choice, for answers that are not streamed."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # when asked for
    token_texts: list[str] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    embedding: list[float] | None = None  # an embedding request's answer
