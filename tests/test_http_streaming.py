"""The streaming fast path, without a server: pre-encoded SSE events, outputs merged when the event loop
is behind, one loop wake-up per engine step, and the cached-token count of usage."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.http.choices import cached_prompt_tokens
from serving.http.engine_client import _OutputRelay, _with_queued
from serving.http.protocol import ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice, CompletionResponse
from serving.http.sse import TextEvents, event
from serving.request import EngineOutput, FinishReason

HEADER = {"id": "cmpl-1", "created": 5, "model": 'a "quoted"\u2028model'}
TEXTS = ["", " hi", 'a"b\\c\n\t', "\u2028\x85é😀", "\x00", "\ufffd", "data: [DONE]\n\n"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_text_events_equal_the_dumped_chunks(include_usage: bool) -> None:
    exclude = None if include_usage else {"usage"}

    def completion(index: int, text: str) -> dict:
        choice = CompletionChoice(index=index, text=text, finish_reason=None)
        return CompletionResponse(**HEADER, choices=[choice]).model_dump(exclude=exclude)

    def chat(index: int, text: str) -> dict:
        choice = ChatChunkChoice(index=index, delta=ChatDelta(content=text))
        return ChatCompletionChunk(**HEADER, choices=[choice]).model_dump(exclude=exclude)

    for make in (completion, chat):
        events = TextEvents(make)
        for index in (0, 7):
            for text in TEXTS:
                assert events(index, text) == event(make(index, text))


def output(*ids: int, reason: FinishReason | None = None, cached: int = 0, at: float = 0.0) -> EngineOutput:
    return EngineOutput("r", list(ids), reason is not None, reason, num_cached_tokens=cached, produced_at=at)


async def test_queued_outputs_merge_per_choice_in_order() -> None:
    queue: asyncio.Queue[tuple[int, EngineOutput]] = asyncio.Queue()
    for item in [(1, output(at=1.5)), (0, output(11, cached=4, at=2.0)), (1, output(20, at=2.0)),
                 (1, output(21, reason=FinishReason.LENGTH, at=3.0)), (1, output(reason=FinishReason.ABORT)),
                 (0, output(12, at=3.0))]:  # fmt: skip
        queue.put_nowait(item)
    merged = _with_queued(queue, (0, output(10, at=1.0)))
    assert queue.empty()
    assert [(i, o.new_token_ids, o.finish_reason, o.num_cached_tokens, since, o.produced_at)
            for i, o, since in merged] == [
        (0, [10, 11, 12], None, 4, 1.0, 3.0),  # produced from 1.0 (its first token) to 3.0 (its last)
        # the abort echo after the final output is dropped; an output without tokens times none of them
        (1, [20, 21], FinishReason.LENGTH, 0, 2.0, 3.0),
    ]


async def test_relay_wakes_the_loop_once_per_flush() -> None:
    loop = asyncio.get_running_loop()
    relay = _OutputRelay(loop)
    queues: list[asyncio.Queue[tuple[int, EngineOutput]]] = [asyncio.Queue() for _ in range(3)]
    wakeups = 0
    deliver = relay._deliver

    def counting_deliver() -> None:
        nonlocal wakeups
        wakeups += 1
        deliver()

    relay._deliver = counting_deliver  # type: ignore[method-assign]

    def engine_step() -> None:
        for index, queue in enumerate(queues):
            relay.sink(queue, index)(output(index))
        relay.flush()
        relay.flush()  # nothing new: no second wake-up

    await asyncio.to_thread(engine_step)
    got = [await asyncio.wait_for(queue.get(), 5) for queue in queues]
    assert [(i, o.new_token_ids) for i, o in got] == [(0, [0]), (1, [1]), (2, [2])]
    assert wakeups == 1
    relay.flush()  # nothing pending: nothing scheduled
    await asyncio.sleep(0)
    assert wakeups == 1


def test_relay_on_a_closed_loop_drops_quietly() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    relay = _OutputRelay(loop)
    relay.sink(asyncio.Queue(), 0)(output(1))
    thread = threading.Thread(target=relay.flush)
    thread.start()
    thread.join()


def test_cached_prompt_tokens_counts_each_prompt_once() -> None:
    assert cached_prompt_tokens([0], 1) == 0
    assert cached_prompt_tokens([64, 32, 64], 3) == 32  # one prompt, 3 choices: what every choice reused
    assert cached_prompt_tokens([64, 64, 0, 16], 2) == 64  # two prompts of 2 choices
