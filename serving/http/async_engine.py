"""The one bridge between the asyncio handlers and the engine thread.

`fan_out` validates every choice of an HTTP request up front (so a bad option is a 400 before a
stream starts and before anything runs); `generate` submits them and yields each choice's text as the
engine produces it. The engine calls each request's sink on its own thread; the sink hands the output
to the event loop with `call_soon_threadsafe`. Whatever ends the iteration (the last choice finishing,
a client disconnect cancelling the handler, an error), every request still running is aborted, so the
engine frees its pages at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from serving.engine.engine import Engine
from serving.engine.request import MAX_SEED, EngineOutput, EngineRequest, FinishReason, GenerationConfig
from serving.http.errors import APIError
from serving.text.output import OutputProcessor, TextDelta

logger = logging.getLogger(__name__)


def fan_out(
    engine: Engine,
    prompts: Sequence[list[int]],
    config: GenerationConfig,
    n: int,
    request_id: str,
    max_log_len: int | None = None,
) -> list[EngineRequest]:
    """One engine request per choice: prompt p's choice i has index p*n+i and, with a seed, seed+index.

    Raises the engine's InvalidRequestError before anything is submitted.
    """
    requests = []
    for p, prompt_ids in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            choice_config = config
            if config.random_seed is not None:
                choice_config = dataclasses.replace(config, random_seed=(config.random_seed + index) % (MAX_SEED + 1))
            requests.append(engine.make_request(prompt_ids, choice_config, f"{request_id}-{index}"))
    if logger.isEnabledFor(logging.INFO):
        for p, prompt_ids in enumerate(prompts):
            text = engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            logger.info(
                "%s prompt %d: %d tokens, n=%d, %s: %r",
                request_id,
                p,
                len(prompt_ids),
                n,
                config,
                text if max_log_len is None else text[:max_log_len],
            )
    return requests


@dataclass
class ChoiceResult:
    """A finished choice, for answers that are not streamed."""

    text: str = ""
    finish_reason: str | None = None
    num_completion_tokens: int = 0


async def generate(engine: Engine, requests: Sequence[EngineRequest]) -> AsyncGenerator[tuple[int, TextDelta], None]:
    """Yield `(choice index, TextDelta)` for every increment of every request, interleaved as produced.

    Raises APIError 503 if the engine is not running or ends a request on its own (shutdown), and
    500 if the engine fails a request.
    """
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[tuple[int, EngineOutput]] = asyncio.Queue()

    def sink_for(index: int) -> Callable[[EngineOutput], None]:
        def sink(output: EngineOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, (index, output))
            except RuntimeError:  # the event loop has closed: the server is gone and nobody waits
                pass

        return sink

    pending: dict[int, tuple[EngineRequest, OutputProcessor]] = {}
    try:
        for index, request in enumerate(requests):
            pending[index] = (
                request,
                OutputProcessor(engine.tokenizer, request.prompt_token_ids, request.config),
            )
            try:
                engine.submit(request, sink_for(index))
            except RuntimeError as error:
                raise APIError(503, f"the engine is not running: {error}", code="engine_stopped") from error
        while pending:
            index, output = await outputs.get()
            if index not in pending:
                continue  # the abort echo of a choice a stop string already ended
            request, processor = pending[index]
            if output.error is not None or output.finish_reason is FinishReason.ERROR:
                raise APIError(
                    500,
                    f"the engine failed request {request.request_id}: {output.error}",
                    code="engine_error",
                )
            if output.finish_reason is FinishReason.ABORT:
                raise APIError(503, "the server is shutting down; the request was aborted", code="aborted")
            delta = processor.process(output)
            if delta.finished:
                del pending[index]
                if not output.finished:  # a stop string ended it: the engine still runs it
                    engine.abort(request.request_id)
            yield index, delta
    finally:
        for request, _ in pending.values():
            engine.abort(request.request_id)


async def collect(engine: Engine, requests: Sequence[EngineRequest]) -> list[ChoiceResult]:
    """Run the requests to the end; results in choice order."""
    results = [ChoiceResult() for _ in requests]
    async with aclosing(generate(engine, requests)) as deltas:
        async for index, delta in deltas:
            result = results[index]
            result.text += delta.text
            result.num_completion_tokens = delta.num_completion_tokens
            if delta.finished:
                result.finish_reason = delta.finish_reason
    return results
