"""Prompt preparation (chat templates, tokenization) on a pool of its own, admitted like generation.

Preparing a prompt costs CPU in proportion to its length, and it happens before the server knows
whether the prompt fits the session at all. On the event loop's default thread pool, shared with
every request, a dozen prompts of a few megabytes once made a two-token completion wait 21 seconds:
every request queued behind them, and none was refused. Here:

- preparation runs on `PREPARATION_WORKERS` threads of its own (the tokenizer releases the GIL while
  it works, so they run beside the event loop);
- encoding stops as soon as a prompt is known to be too long (`Tokenizer.encode_at_most`), so a huge
  prompt costs about what the longest acceptable one does;
- a large prompt (over `LARGE_PROMPT_CHARS` characters) may take all workers but one, so a small
  prompt never waits behind large ones; at most `MAX_WAITING_LARGE` large prompts wait for a worker,
  and beyond that a request gets 503 `server_overloaded` with `Retry-After`, as admission answers a
  full queue, rather than adding to everyone's latency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from serving.http.errors import unavailable

T = TypeVar("T")

PREPARATION_WORKERS = 4
# About 16k tokens of text: tens of milliseconds to render and encode.
LARGE_PROMPT_CHARS = 64 * 1024
MAX_WAITING_LARGE = 8


class PromptPreparation:
    """The pool, and the bound on the large prompts waiting for it. Used on one event loop."""

    def __init__(self, workers: int = PREPARATION_WORKERS, large_chars: int = LARGE_PROMPT_CHARS,
                 max_waiting_large: int = MAX_WAITING_LARGE):
        if workers < 2:
            raise ValueError("prompt preparation needs two workers: one is kept for small prompts")
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xlserve-prompts")
        self.large_chars = large_chars
        self.max_waiting_large = max_waiting_large
        self.waiting_large = 0
        self._large_slots = asyncio.Semaphore(workers - 1)

    async def run(self, chars: int, work: Callable[[], T]) -> T:
        """`work()` on the pool; `chars` is the size of the prompt text it prepares (its cost).
        Raises 503 `server_overloaded` when too many large prompts wait already."""
        loop = asyncio.get_running_loop()
        if chars <= self.large_chars:
            return await loop.run_in_executor(self._executor, work)
        if self.waiting_large >= self.max_waiting_large:
            raise unavailable(
                f"the server is preparing too many large prompts ({self.max_waiting_large} waiting); retry later",
                "server_overloaded",
            )
        self.waiting_large += 1
        try:
            await self._large_slots.acquire()
        finally:
            self.waiting_large -= 1
        future = self._executor.submit(work)
        # The slot comes back when the work ends, not when a client that hung up stops waiting for it.
        future.add_done_callback(lambda _: _call_soon(loop, self._large_slots.release))
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop has closed: the server is gone, and the slot with it
        pass
