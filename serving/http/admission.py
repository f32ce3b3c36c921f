"""Admission control: a bounded number of choices generating at once, a bounded queue behind them.

Every choice (a prompt times `n`) is one engine request and takes one slot, so a request with `n=8`
weighs eight times a request with `n=1`. Up to `max_running` slots are handed to the engine; requests
beyond that wait here in arrival order, up to `max_queued` slots; a request that finds the queue full
gets 503 with `Retry-After` at once, so a load balancer (or the openai SDK, which retries 503s) can
try elsewhere instead of piling onto an unbounded queue. The queue is strictly first-in, first-out:
a large request at its head is not overtaken by small ones behind it, so it cannot starve.

Everything here runs on the event loop's thread, so plain counters need no lock.
"""

from __future__ import annotations

import asyncio
from collections import deque

from serving.http.errors import APIError, unavailable


class Ticket:
    """One request's claim on `slots` slots: admitted now or queued; released exactly once."""

    def __init__(self, admission: Admission, slots: int, admitted: bool):
        self.admission = admission
        self.slots = slots
        self.admitted = admitted
        self.released = False
        self._turn: asyncio.Future[None] | None = None if admitted else asyncio.get_running_loop().create_future()

    async def wait(self, deadline: float | None = None) -> None:
        """Return once the request may run; 503 if `deadline` (event-loop time) passes first."""
        if self.admitted:
            return
        assert self._turn is not None
        try:
            async with asyncio.timeout_at(deadline):
                await self._turn
        except TimeoutError:
            self.release()
            raise unavailable(
                "the request timed out waiting for a free slot; the server is overloaded", "queue_timeout"
            ) from None

    def release(self) -> None:
        """Give the slots back (or leave the queue). Idempotent: every path out of a request calls it."""
        if not self.released:
            self.released = True
            self.admission._release(self)

    def _admit(self) -> None:
        self.admitted = True
        if self._turn is not None and not self._turn.done():
            self._turn.set_result(None)


class Admission:
    def __init__(self, max_running: int, max_queued: int):
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"need max_running >= 1 and max_queued >= 0, got {max_running}, {max_queued}")
        self.max_running = max_running
        self.max_queued = max_queued
        self.running = 0  # slots handed to the engine
        self.queued = 0  # slots waiting for their turn
        self._queue: deque[Ticket] = deque()

    def reserve(self, slots: int) -> Ticket:
        """Admit `slots` choices now, or queue them; raises 400 if they could never run, 503 if the
        queue is full."""
        if slots > self.max_running:
            raise APIError(
                400,
                f"this request asks for {slots} choices (prompts × n), more than this server runs at once "
                f"({self.max_running}, --max-concurrent-requests); split it into smaller requests",
                param="n",
                code="too_many_choices",
            )
        if not self._queue and self.running + slots <= self.max_running:
            self.running += slots
            return Ticket(self, slots, admitted=True)
        if self.queued + slots > self.max_queued:
            raise unavailable(
                f"the server is at capacity ({self.running} choices running, {self.queued} queued); retry later",
                "server_overloaded",
            )
        ticket = Ticket(self, slots, admitted=False)
        self._queue.append(ticket)
        self.queued += slots
        return ticket

    def _release(self, ticket: Ticket) -> None:
        if ticket.admitted:
            self.running -= ticket.slots
        else:
            self._queue.remove(ticket)
            self.queued -= ticket.slots
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._queue and self.running + self._queue[0].slots <= self.max_running:
            ticket = self._queue.popleft()
            self.queued -= ticket.slots
            self.running += ticket.slots
            ticket._admit()
