"""Continuous batching: which sequences run in the next step, and with how many tokens each.

A sequence's tokens are its prompt followed by what it has generated; `num_computed` of them have
their keys/values in the cache. Each step processes, for every scheduled sequence, the tokens from
`num_computed` on: exactly one for a sequence that is decoding, a chunk of the prompt for one that is
still prefilling. When a sequence's scheduled tokens reach its end, the step samples its next token.
The same rule covers a preempted sequence: it lost its pages, `num_computed` went back to 0, and its
prompt plus everything it generated is prefilled again (recompute), so its output continues unchanged.

Policy, per step:
1. Running sequences keep their place; each gets pages for its next tokens. When pages run out, the
   newest running sequence is preempted (freed, put back at the head of the queue) until they fit.
2. Waiting sequences join in arrival order while the batch has room, pages and prefill budget.
3. Prefill chunks share a token budget (`max_prefill_token_num`) and must fit a compiled bucket, so a
   long prompt is split over several steps and never stalls the decoding sequences.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.engine.config import BucketSet
from serving.engine.pages import OutOfPages, PageAllocator
from serving.engine.request import EngineOutput, EngineRequest


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: EngineRequest
    sink: Callable[[EngineOutput], None]
    arrival: int
    token_ids: list[int]  # the prompt, then every generated token the host has read back
    num_prompt_tokens: int
    num_computed: int = 0  # tokens whose keys/values are in (or on their way to) the cache
    # Tokens sampled by dispatched steps but not read back yet (0 or 1): the engine reads each step's
    # tokens only after dispatching the next, which takes its input token from the device.
    num_pending: int = 0
    pages: list[int] = field(default_factory=list)
    slot: int = -1  # row of the engine's per-sequence device state while running
    admissions: int = 0  # times it has started running (preemption restarts it): keys per-slot state
    status: SeqStatus = SeqStatus.WAITING
    max_new_tokens: int = 0  # already capped by the session length

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def length(self) -> int:
        """All tokens of the sequence, including sampled ones not read back yet."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        """Generated tokens, read back or not: the index of the next token to sample."""
        return self.length - self.num_prompt_tokens

    @property
    def num_read(self) -> int:
        """Generated tokens the host has read back (and reported)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_remaining(self) -> int:
        """Tokens not yet in the cache (1 when decoding)."""
        return self.length - self.num_computed

    @property
    def done_sampling(self) -> bool:
        """Every allowed token is sampled; the last may still be on its way back."""
        return self.num_generated >= self.max_new_tokens


@dataclass(frozen=True)
class Chunk:
    """`length` tokens of `seq` starting at token `start`; `samples` when they reach its end.

    `samples` is fixed when the chunk is planned: by the time its tokens are read back, later
    dispatches have already grown the sequence.
    """

    seq: Sequence
    start: int
    length: int
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", self.start + self.length == self.seq.length)


@dataclass
class Schedule:
    decode: list[Chunk] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, allocator: PageAllocator, buckets: BucketSet, page_size: int, max_batch_size: int):
        self.allocator = allocator
        self.buckets = buckets
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order, oldest first
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self.num_preemptions = 0

    # ----- membership -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence for good and free its pages and slot at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._drop_resources(seq)
        seq.status = SeqStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ----- the per-step decision ------------------------------------------------------------------
    def schedule(self) -> Schedule:
        plan = Schedule()
        budget = self.buckets.max_prefill_tokens
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.done_sampling:  # preempted, or only awaiting read-back
                continue
            decoding = seq.num_remaining == 1
            length = 1 if decoding else min(seq.num_remaining, self.buckets.max_chunk, budget)
            if not decoding and (length <= 0 or not self._prefill_fits(plan, length)):
                continue  # prefill budget spent: this chunk waits a step, decodes go on
            if not self._reserve_or_preempt(seq, length, plan):
                continue
            (plan.decode if decoding else plan.prefill).append(Chunk(seq, seq.num_computed, length))
            budget -= 0 if decoding else length
        self._admit(plan, budget)
        return plan

    def _admit(self, plan: Schedule, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.num_pending:
                return  # preempted with a token in flight: recompute once it is read back
            decoding = seq.num_remaining == 1
            length = 1 if decoding else min(seq.num_remaining, self.buckets.max_chunk, budget)
            if not decoding and length < min(seq.num_remaining, self.page_size):
                return  # too little budget left to make useful progress on this prompt
            if not decoding and not self._prefill_fits(plan, length):
                return
            if not self._reserve(seq, length):
                return
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.slot = self._free_slots.pop()
            seq.admissions += 1
            self.running.append(seq)
            (plan.decode if decoding else plan.prefill).append(Chunk(seq, seq.num_computed, length))
            budget -= 0 if decoding else length

    def _prefill_fits(self, plan: Schedule, length: int) -> bool:
        longest = max([c.length for c in plan.prefill] + [length])
        return self.buckets.prefill_bucket(len(plan.prefill) + 1, longest) is not None

    def _reserve(self, seq: Sequence, length: int) -> bool:
        """Give `seq` the pages it needs to hold `length` more tokens; False if there are not enough."""
        needed = -(-(seq.num_computed + length) // self.page_size) - len(seq.pages)
        if needed <= 0:
            return True
        try:
            seq.pages.extend(self.allocator.allocate(needed))
        except OutOfPages:
            return False
        return True

    def _reserve_or_preempt(self, seq: Sequence, length: int, plan: Schedule) -> bool:
        while not self._reserve(seq, length):
            victim = self.running[-1]  # the newest running sequence gives way
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, plan: Schedule) -> None:
        self.running.remove(seq)
        for chunks in (plan.decode, plan.prefill):
            chunks[:] = [c for c in chunks if c.seq is not seq]
        self._drop_resources(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        # Back to the head of the queue, still ahead of everything that arrived after it.
        index = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)
        plan.preempted.append(seq)
        self.num_preemptions += 1

    def _drop_resources(self, seq: Sequence) -> None:
        if seq.pages:
            self.allocator.release(seq.pages)
            seq.pages = []
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1
