"""Admission slots and the queue behind them, on their own (no server): FIFO order, n as n slots,
503 with Retry-After when the queue is full, queue timeouts, and no slot leaked by any way out; and the
prompt preparation pool, admitted likewise."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.http.admission import Admission
from serving.http.errors import APIError
from serving.http.preparation import PromptPreparation


async def test_admits_up_to_the_limit_then_queues_then_refuses() -> None:
    admission = Admission(max_running=4, max_queued=3)
    first = admission.reserve(3)
    assert first.admitted and admission.running == 3
    queued = admission.reserve(2)  # 3 + 2 > 4: waits
    assert not queued.admitted and admission.queued == 2
    with pytest.raises(APIError) as refused:
        admission.reserve(2)  # 2 + 2 > 3 queued
    error = refused.value
    assert (error.status, error.code, error.headers["Retry-After"]) == (503, "server_overloaded", "1")
    small = admission.reserve(1)  # fits the queue; waits behind `queued` although a slot is free (FIFO)
    assert not small.admitted and admission.queued == 3
    first.release()
    await asyncio.wait_for(queued.wait(), 1)
    await asyncio.wait_for(small.wait(), 1)
    assert (admission.running, admission.queued) == (3, 0)
    queued.release()
    small.release()
    small.release()  # idempotent
    assert (admission.running, admission.queued) == (0, 0)


async def test_a_request_larger_than_the_limit_is_a_400() -> None:
    with pytest.raises(APIError) as raised:
        Admission(max_running=4, max_queued=100).reserve(5)
    assert (raised.value.status, raised.value.param) == (400, "n")


async def test_queue_timeout_and_cancellation_give_the_place_back() -> None:
    admission = Admission(max_running=1, max_queued=2)
    running = admission.reserve(1)
    late = admission.reserve(1)
    loop = asyncio.get_running_loop()
    with pytest.raises(APIError) as raised:
        await late.wait(deadline=loop.time() + 0.05)
    assert (raised.value.status, raised.value.code) == (503, "queue_timeout")
    assert admission.queued == 0
    cancelled = admission.reserve(1)
    waiter = asyncio.ensure_future(cancelled.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    cancelled.release()  # what the request's clean-up does
    running.release()
    assert (admission.running, admission.queued) == (0, 0)


async def test_prompt_preparation_keeps_a_worker_for_small_prompts_and_bounds_large_ones() -> None:
    """Large prompts take all workers but one and wait in a bounded line (then 503); a small prompt runs
    at once however many large ones are in the pool; a slot comes back when the work ends."""
    preparation = PromptPreparation(workers=2, large_chars=100, max_waiting_large=1)
    release = threading.Event()
    try:
        running = asyncio.create_task(preparation.run(1000, lambda: release.wait(10)))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(preparation.run(1000, lambda: "second"))
        await asyncio.sleep(0.05)
        assert preparation.waiting_large == 1
        with pytest.raises(APIError) as refused:
            await preparation.run(1000, lambda: "third")
        error = refused.value
        assert (error.status, error.code, error.headers["Retry-After"]) == (503, "server_overloaded", "1")
        assert await asyncio.wait_for(preparation.run(10, lambda: "small"), 1) == "small"
        running.cancel()  # a client gone: its work still holds the slot until it ends
        await asyncio.sleep(0.05)
        assert not waiting.done()
        release.set()
        assert await asyncio.wait_for(waiting, 5) == "second"
    finally:
        release.set()
        preparation.shutdown()
