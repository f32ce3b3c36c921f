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
   long prompt is split over several steps and never stalls the decoding sequences. A sequence may
   take several rows of one step, each a consecutive chunk of at most `max_chunk` tokens: every
   layer writes the whole step's keys and values before it attends, so a row sees the rows before it.
   Rows stay short, so a batch of mixed prompt lengths pads each prompt by less than one row, not
   every row to the longest prompt (B2: 3x padded tokens with one row per prompt, docs/perf-notes.md).
   With packed prefill (`config.BucketSet`) the matmuls skip even that padding, and a step that passes
   a packed bucket by a little leaves the tail of its last prompt to the next step.

Prefix caching (see `pages`). A sequence that starts (or restarts after preemption) first takes the
cached pages of the longest cached prefix of its tokens and computes only the rest; at least one
token is always computed, since its logits are what the first sample needs. Pages are registered once
the step that filled them has been read back, so a page whose step failed is never shared. A request
with a repetition penalty computes its whole prompt (the penalty's seen-tokens table is filled by the
tokens a step processes), but still registers its pages for others.

Sessions (`/v1/chat/interactive`): when a sequence with a `session_id` finishes, its registered pages
stay referenced ("pinned") under that id until the session's next turn finishes, the session ends,
or pages run short: then the least recently pinned session is unpinned before any running sequence is
preempted, and its next turn recomputes whatever was evicted meanwhile.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.engine.config import BucketSet
from serving.engine.page_hash import ROOT_KEY, page_key
from serving.engine.pages import OutOfPages, PageAllocator, PageContent
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
    # Prefix-cache (key, content) of its full pages so far: named once, however often it is looked up.
    page_names: list[tuple[int, PageContent]] = field(default_factory=list)
    num_registered: int = 0  # leading pages registered in (or taken from) the prefix cache
    num_cached_tokens: int = 0  # prompt tokens its first admission took from the prefix cache

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def session_id(self) -> str | None:
        return self.request.session_id

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
    """`length` tokens of `seq` starting at token `start`; `samples` when they reach its end; `first`
    when it is the first chunk since the sequence was admitted (its seen-tokens row starts over).

    `samples` and `admission` are fixed when the chunk is planned: by the time its tokens are read
    back, later dispatches have grown the sequence, and it may even have been preempted and restarted.
    """

    seq: Sequence
    start: int
    length: int
    first: bool = False
    samples: bool = field(init=False)
    admission: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", self.start + self.length == self.seq.length)
        object.__setattr__(self, "admission", self.seq.admissions)


@dataclass
class Schedule:
    decode: list[Chunk] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, allocator: PageAllocator, buckets: BucketSet, page_size: int, max_batch_size: int,
                 prefix_caching: bool = True):
        self.allocator = allocator
        self.buckets = buckets
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.prefix_caching = prefix_caching  # off: only sessions use the cache, for their own history
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order, oldest first
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self.pins: OrderedDict[str, list[int]] = OrderedDict()  # session id -> its pinned pages, oldest first
        self.num_preemptions = 0
        self.num_reused_tokens = 0  # prompt tokens taken from the prefix cache, over all admissions

    # ----- membership -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence for good and free its pages and slot at once (a session's sequence first
        pins its registered pages)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        if seq.session_id is not None and seq.num_registered:  # else the session keeps its previous pin
            self._pin(seq.session_id, self._cached_prefix(seq, seq.num_registered))
        self._drop_resources(seq)
        seq.status = SeqStatus.FINISHED

    def end_session(self, session_id: str) -> None:
        """Unpin a session's pages: they stay cached until evicted."""
        pages = self.pins.pop(session_id, None)
        if pages:
            self.allocator.release(pages[::-1])

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ----- the per-step decision ------------------------------------------------------------------
    def schedule(self) -> Schedule:
        plan = Schedule()
        budget = self.buckets.prefill_budget
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.done_sampling:  # preempted, or only awaiting read-back
                continue
            if seq.num_remaining == 1:
                if self._reserve_or_preempt(seq, 1, plan):
                    plan.decode.append(Chunk(seq, seq.num_computed, 1))
                continue
            rows = self._prefill_rows(plan, seq, budget)
            if not rows:
                continue  # prefill budget spent: this sequence waits a step, decodes go on
            if self._reserve_or_preempt(seq, sum(rows), plan):
                self._plan_prefill(plan, seq, rows, first=False)
                budget -= sum(rows)
        self._admit(plan, budget)
        if plan.prefill and self.buckets.packed_prefill:
            self._trim_to_packed_bucket(plan)
        return plan

    def _prefill_rows(self, plan: Schedule, seq: Sequence, budget: int) -> list[int]:
        """Lengths of the consecutive chunks (one row each) `seq` can prefill in this step: as many rows
        of up to `max_chunk` tokens as the budget and the compiled buckets allow."""
        rows: list[int] = []
        todo = min(seq.num_remaining, budget)
        while todo > 0:
            length = min(todo, self.buckets.max_chunk)
            if not self._prefill_fits(plan, length, extra_rows=rows):
                break
            rows.append(length)
            todo -= length
        return rows

    @staticmethod
    def _plan_prefill(plan: Schedule, seq: Sequence, rows: list[int], first: bool) -> None:
        start = seq.num_computed
        for i, length in enumerate(rows):
            plan.prefill.append(Chunk(seq, start, length, first=first and i == 0))
            start += length

    def _admit(self, plan: Schedule, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.num_pending:
                return  # preempted with a token in flight: recompute once it is read back
            self._reuse_prefix(seq)
            decoding = seq.num_remaining == 1
            rows = [1] if decoding else self._prefill_rows(plan, seq, budget)
            # A prefill that cannot do at least a page (or the whole rest) now waits for a fuller budget.
            fits = decoding or sum(rows) >= min(seq.num_remaining, self.page_size)
            if not fits or not self._reserve(seq, sum(rows)):
                self._drop_resources(seq)  # give the reused pages back: it retries from scratch
                seq.num_computed = seq.num_registered = 0
                return
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.slot = self._free_slots.pop()
            if seq.admissions == 0:
                seq.num_cached_tokens = seq.num_computed
            self.num_reused_tokens += seq.num_computed
            seq.admissions += 1
            self.running.append(seq)
            if decoding:
                plan.decode.append(Chunk(seq, seq.num_computed, 1, first=True))
            else:
                self._plan_prefill(plan, seq, rows, first=True)
                budget -= sum(rows)

    def _prefill_fits(self, plan: Schedule, length: int, extra_rows: list[int] = ()) -> bool:
        """Whether one more row of `length` tokens (after the planned rows and `extra_rows`) fits a bucket."""
        rows = [c.length for c in plan.prefill] + list(extra_rows) + [length]
        return self.buckets.prefill_bucket(len(rows), max(rows), sum(rows)) is not None

    def _trim_to_packed_bucket(self, plan: Schedule) -> None:
        """With packed prefill, a step whose prompt tokens pass a bucket by less than they fall short of the
        next one leaves the excess, the tail of its last prompt, to the next step rather than computing
        padding: with a queue of prompts, every step then computes close to a whole bucket."""
        total = sum(c.length for c in plan.prefill)
        below = self.buckets.packed_bucket_below(total)
        if below is None or below == total:
            return
        above = self.buckets.prefill_bucket(len(plan.prefill), max(c.length for c in plan.prefill), total)
        excess = total - below
        last = plan.prefill[-1].seq  # its rows are the plan's last ones
        if excess >= above.packed - total or excess >= sum(c.length for c in plan.prefill if c.seq is last):
            return  # padding up wastes less, or the cut would take the whole prompt
        trimmed = list(plan.prefill)
        while excess:
            chunk = trimmed.pop()
            if chunk.length > excess:
                trimmed.append(Chunk(last, chunk.start, chunk.length - excess, first=chunk.first))
                break
            excess -= chunk.length
        if self.buckets.prefill_bucket(len(trimmed), max(c.length for c in trimmed), below) is not None:
            plan.prefill[:] = trimmed

    def _reserve(self, seq: Sequence, length: int) -> bool:
        """Give `seq` the pages it needs to hold `length` more tokens, unpinning idle sessions' pages
        if need be; False if there are still not enough."""
        needed = -(-(seq.num_computed + length) // self.page_size) - len(seq.pages)
        if needed <= 0:
            return True
        while True:
            try:
                seq.pages.extend(self.allocator.allocate(needed))
                return True
            except OutOfPages:
                if not self.pins:
                    return False
                self.end_session(next(iter(self.pins)))  # the least recently pinned gives way

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
        seq.num_computed = seq.num_registered = 0
        seq.status = SeqStatus.WAITING
        # Back to the head of the queue, still ahead of everything that arrived after it.
        index = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)
        plan.preempted.append(seq)
        self.num_preemptions += 1

    def _drop_resources(self, seq: Sequence) -> None:
        if seq.pages:
            self.allocator.release(seq.pages[::-1])  # tail first: evicted before the shared head
            seq.pages = []
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    # ----- prefix caching ---------------------------------------------------------------------------
    def register_pages(self, chunk: Chunk) -> None:
        """Enter the pages that `chunk`'s step (now read back) filled into the prefix cache."""
        seq = chunk.seq
        full = min(chunk.start + chunk.length, len(seq.token_ids)) // self.page_size
        if full <= seq.num_registered:
            return  # no page filled up: the common case, once per decoding sequence per step
        if not self._uses_cache(seq) or seq.status is not SeqStatus.RUNNING or chunk.admission != seq.admissions:
            return  # preempted (or restarted) since: these pages are no longer its own
        for index in range(seq.num_registered, full):
            key, content = self._page_name(seq, index)
            self.allocator.register(seq.pages[index], key, content)
        seq.num_registered = max(seq.num_registered, full)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a sequence on the cached pages of its longest cached prefix."""
        if not self._uses_cache(seq) or seq.request.config.repetition_penalty != 1.0:
            return
        pages = self._cached_prefix(seq, (seq.length - 1) // self.page_size)  # leave a token to compute
        if pages:
            self.allocator.share(pages)
            seq.pages = pages
            seq.num_computed = len(pages) * self.page_size
            seq.num_registered = len(pages)

    def _cached_prefix(self, seq: Sequence, max_pages: int) -> list[int]:
        """The cached pages holding the longest prefix of `seq`'s first `max_pages` full pages."""
        pages = []
        for index in range(max_pages):
            page = self.allocator.lookup(*self._page_name(seq, index))
            if page is None:
                break
            pages.append(page)
        return pages

    def _page_name(self, seq: Sequence, index: int) -> tuple[int, PageContent]:
        """Key and content of `seq`'s full page `index` (its tokens must be known; pages are named in order)."""
        if index == len(seq.page_names):
            start = index * self.page_size
            tokens = tuple(seq.token_ids[start : start + self.page_size])
            parent = seq.page_names[-1][0] if index else ROOT_KEY
            seq.page_names.append((page_key(parent, tokens), PageContent(parent, tokens)))
        return seq.page_names[index]

    def _uses_cache(self, seq: Sequence) -> bool:
        return self.prefix_caching or seq.session_id is not None

    def _pin(self, session_id: str, pages: list[int]) -> None:
        self.allocator.share(pages)  # before the old pin goes, so pages in both are never evicted
        self.end_session(session_id)
        self.pins[session_id] = pages
