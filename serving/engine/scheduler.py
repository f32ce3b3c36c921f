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

The scheduler owns each request's state machine, as vLLM's: `add_request` -> `schedule` (plans a step
and counts its tokens as computed) -> `update_from_output` (the step's sampled tokens: append, stop,
finish). The runner sees only the plain `Chunk`s of a plan, never a `SequenceState`. Page arithmetic,
prefix caching and session pins live in the KV cache manager (`kv_cache`); this module keeps policy.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.engine.config import BucketSet
from serving.engine.kv_cache import KVCacheManager, SeqPages
from serving.engine.pages import PageAllocator
from serving.request import EngineOutput, EngineRequest, FinishReason, GenerationConfig, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    """The scheduler's record of one request: where it stands in the state machine."""

    request: EngineRequest
    arrival: int
    token_ids: list[int]  # the prompt, then every generated token the host has read back
    num_prompt_tokens: int
    max_new_tokens: int  # already capped by the session length
    num_computed: int = 0  # tokens whose keys/values are in (or on their way to) the cache
    # Tokens sampled by dispatched steps but not read back yet (0 or 1): the engine reads each step's
    # tokens only after dispatching the next, which takes its input token from the device.
    num_pending: int = 0
    held: SeqPages = field(default_factory=SeqPages)  # its pages (the KV cache manager's)
    slot: int = -1  # row of the engine's per-sequence device state while running
    admissions: int = 0  # times it has started running (preemption restarts it): keys per-slot state
    status: SeqStatus = SeqStatus.WAITING
    num_cached_tokens: int = 0  # prompt tokens its first admission took from the prefix cache
    num_prompt_logprobs: int = 0  # prompt positions whose log probability has been reported (from the second)
    reports_tokens: bool = True  # False: run only for its prompt logprobs or, embedding, its hidden state

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


@dataclass(frozen=True, slots=True)
class Chunk:
    """One row of a step, as plain data for the runner: `length` tokens of a request from token `start`.

    All of it is fixed when the chunk is planned: by the time its tokens are read back, later steps have
    grown the sequence, and it may even have been preempted and restarted (`admission` tells).
    """

    request: EngineRequest  # the immutable request (its sampling options fill the slot's row)
    slot: int  # row of the per-sequence device state
    admission: int  # the sequence's admission count: a new one means the slot's row starts over
    start: int
    length: int
    token_ids: list[int]  # the chunk's tokens; [] for a lone decode token still on the device
    pages: list[int]  # the sequence's pages (read at dispatch: the runner copies those it lacks)
    step: int  # tokens generated before this row's sample: its sampler step
    samples: bool  # the chunk reaches the sequence's end: the step samples its next token
    first: bool  # the first chunk since admission: its seen-tokens row starts over
    target: int = -1  # a one-token prompt row's next prompt token, whose log probability it reports

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class Schedule:
    decode: list[Chunk] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)


class Scheduler:
    def __init__(self, allocator: PageAllocator, buckets: BucketSet, page_size: int, max_batch_size: int,
                 max_session_len: int, prefix_caching: bool = True):
        self.kv = KVCacheManager(allocator, page_size, prefix_caching)
        self.buckets = buckets
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_session_len = max_session_len
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []  # in arrival order, oldest first
        self._by_id: dict[str, SequenceState] = {}  # every waiting or running sequence
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self._arrivals = 0
        self.num_preemptions = 0
        self.num_reused_tokens = 0  # prompt tokens taken from the prefix cache, over all admissions
        self.num_prompt_tokens_computed = 0  # prefilled (or recomputed), i.e. not taken from the cache

    # ----- the request's life -------------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> EngineOutput | None:
        """Queue a request; an output when it is over at once (no room left in the session length)."""
        prompt_len = len(request.prompt_token_ids)
        room = self.max_session_len - prompt_len
        max_new = request.config.max_new_tokens
        seq = SequenceState(request=request, arrival=self._arrivals, token_ids=list(request.prompt_token_ids),
                            num_prompt_tokens=prompt_len,
                            max_new_tokens=room if max_new is None else min(max_new, room))
        self._arrivals += 1
        if (request.embed or max_new == 0 and request.config.prompt_logprobs is not None) and room > 0:
            seq.max_new_tokens, seq.reports_tokens = 1, False  # prefill for the logprobs or hidden state only
        if seq.max_new_tokens <= 0:
            seq.status = SeqStatus.FINISHED
            return _output(seq, [], FinishReason.LENGTH)
        self.waiting.append(seq)
        self._by_id[request.request_id] = seq
        return None

    def update_from_output(self, chunks: list[Chunk], tokens: list[int], logprobs: StepLogprobsHost | None = None,
                           produced_at: float = 0.0, hidden: np.ndarray | None = None) -> list[EngineOutput]:
        """A read-back step: register the pages it filled, and append each sampled token to its sequence,
        finishing the sequence on a stop id or at its length limit. Returns the outputs to report.
        `logprobs` (host arrays of `sampling.StepLogprobs`) when a row of the step asked for them;
        `produced_at`: when the step's tokens were read back (`EngineOutput.produced_at`); `hidden` [rows, E],
        when a row answers an embedding request."""
        outputs = []
        for row, (chunk, token) in enumerate(zip(chunks, tokens, strict=False)):
            seq = self._by_id.get(chunk.request_id)
            if seq is None:
                continue  # finished meanwhile (aborted, failed): its token is moot
            if seq.status is SeqStatus.RUNNING and chunk.admission == seq.admissions:
                # its step has completed, so the pages hold their tokens (unless preempted since)
                self.kv.commit(seq.held, seq.token_ids, chunk.start + chunk.length, seq.session_id)
            config = seq.request.config
            if chunk.target >= 0 and chunk.start == seq.num_prompt_logprobs and logprobs is not None:
                seq.num_prompt_logprobs += 1  # once, even when preemption recomputed the position
                output = _output(seq, [])
                output.prompt_logprobs = [_logprob(logprobs, row, config.prompt_logprobs)]
                outputs.append(output)
            if not chunk.samples:
                continue
            seq.num_pending -= 1
            if not seq.reports_tokens:
                self._remove(seq)
                output = _output(seq, [], FinishReason.LENGTH)
                if seq.request.embed and hidden is not None:
                    output.embedding = hidden[row].astype(np.float32).tolist()
                outputs.append(output)
                continue
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._remove(seq)
            output = _output(seq, [token], reason)
            output.produced_at = produced_at
            if config.logprobs is not None and logprobs is not None:
                output.logprobs = [_logprob(logprobs, row, config.logprobs)]
            outputs.append(output)
        return outputs

    def _finish_reason(self, seq: SequenceState, token: int) -> FinishReason | None:
        """What ends a request in the engine: a stop id (EOS, the request's own, a template's end of
        turn), or its length limit (max_new_tokens or the session length). Stop strings are text, and
        the text layer matches them."""
        if token in seq.request.stop_token_ids:
            return FinishReason.STOP
        if seq.num_read >= seq.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
              error: str | None = None) -> EngineOutput | None:
        """End a waiting or running request now, freeing its pages and slot; its final output, if it was here."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self._remove(seq)
        return _output(seq, [], reason, error)

    def abort_all(self, reason: FinishReason, error: str | None = None) -> list[EngineOutput]:
        return [self.abort(seq.request_id, reason, error) for seq in (*self.running, *self.waiting)]

    def end_session(self, session_id: str) -> None:
        """Unpin an interactive session's pages: they stay cached until evicted."""
        self.kv.end_session(session_id)

    @property
    def batch_limit(self) -> int:
        """Sequences that may run at once: the slots, and no more than the largest decode bucket compiled so
        far (while the server serves with its other buckets still compiling, `config.BucketSet.compiled`)."""
        return min(self.max_batch_size, self.buckets.decode_capacity)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _remove(self, seq: SequenceState) -> None:
        """Remove a sequence for good and free its pages and slot at once (a session's sequence first
        pins its registered pages)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._drop_resources(seq, pin_session=seq.session_id)
        seq.status = SeqStatus.FINISHED
        del self._by_id[seq.request_id]

    # ----- the per-step decision ------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Plan the next step and count its tokens as computed (and its samples as pending): the engine
        dispatches the plan at once, and a plan whose dispatch fails has its requests aborted."""
        plan = Schedule()
        budget = self.buckets.prefill_budget
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.done_sampling:  # preempted, or only awaiting read-back
                continue
            if seq.num_pending and seq.request.guided_on_host:  # its next mask needs the token in flight
                continue
            if seq.num_remaining == 1:
                if self._reserve_or_preempt(seq, 1, plan):
                    plan.decode.append(self._chunk(seq, seq.num_computed, 1))
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
        self._mark_dispatched(plan)
        return plan

    def _mark_dispatched(self, plan: Schedule) -> None:
        for chunk in (*plan.decode, *plan.prefill):
            seq = self._by_id[chunk.request_id]
            seq.num_computed = chunk.start + chunk.length
            seq.num_pending += chunk.samples
        # Every chunk but a decoding sequence's freshly sampled token is prompt (or recompute) work.
        self.num_prompt_tokens_computed += sum(c.length for c in plan.prefill) + sum(c.first for c in plan.decode)

    def _chunk(self, seq: SequenceState, start: int, length: int, first: bool = False) -> Chunk:
        wants_target = (seq.request.config.prompt_logprobs is not None and length == 1
                        and seq.num_prompt_logprobs <= start < seq.num_prompt_tokens - 1)
        return Chunk(request=seq.request, slot=seq.slot, admission=seq.admissions, start=start, length=length,
                     token_ids=seq.token_ids[start : start + length], pages=seq.held.pages,
                     step=seq.num_generated, samples=start + length == seq.length, first=first,
                     target=seq.token_ids[start + 1] if wants_target else -1)

    def _row_limit(self, seq: SequenceState, start: int) -> int:
        """The longest row `seq` may have from position `start`. A request with prompt logprobs takes its
        prompt a token a row (the step computes logits only at each row's last token), and one with
        penalties over generated tokens takes each generated token it recomputes after a preemption in
        a row of its own (the sampler counts a row's first token: `sampling.count_generated`)."""
        config = seq.request.config
        if config.prompt_logprobs is not None and start < seq.num_prompt_tokens:
            return 1
        if counts_generated(config):
            return 1 if start >= seq.num_prompt_tokens else min(self.buckets.max_chunk, seq.num_prompt_tokens - start)
        return self.buckets.max_chunk

    def _prefill_rows(self, plan: Schedule, seq: SequenceState, budget: int) -> list[int]:
        """Lengths of the consecutive chunks (one row each) `seq` can prefill in this step: as many rows
        of up to `max_chunk` tokens (`_row_limit`) as the budget and the compiled buckets allow."""
        rows: list[int] = []
        todo = min(seq.num_remaining, budget)
        while todo > 0:
            length = min(todo, self._row_limit(seq, seq.num_computed + sum(rows)))
            if not self._prefill_fits(plan, length, extra_rows=rows):
                break
            rows.append(length)
            todo -= length
        return rows

    def _plan_prefill(self, plan: Schedule, seq: SequenceState, rows: list[int], first: bool) -> None:
        start = seq.num_computed
        for i, length in enumerate(rows):
            plan.prefill.append(self._chunk(seq, start, length, first=first and i == 0))
            start += length

    def _admit(self, plan: Schedule, budget: int) -> None:
        while self.waiting and len(self.running) < self.batch_limit:
            seq = self.waiting[0]
            if seq.num_pending:
                return  # preempted with a token in flight: recompute once it is read back
            seq.num_computed = self.kv.get_computed(seq.held, seq.token_ids[: seq.length], seq.session_id,
                                                    may_reuse=_may_reuse_cache(seq.request.config))
            decoding = seq.num_remaining == 1
            rows = [1] if decoding else self._prefill_rows(plan, seq, budget)
            # A prefill that cannot do at least a page (or the whole rest, or a token in each of the most
            # rows a step has when it goes a token a row) now waits for a fuller budget.
            needed = min(seq.num_remaining, self.page_size)
            if self._row_limit(seq, seq.num_computed) == 1:
                needed = min(needed, self.buckets.prefill_rows[-1])
            fits = decoding or sum(rows) >= needed
            if not fits or not self.kv.allocate(seq.held, seq.num_computed + sum(rows)):
                self._drop_resources(seq)  # give the reused pages back: it retries from scratch
                seq.num_computed = 0
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
                plan.decode.append(self._chunk(seq, seq.num_computed, 1, first=True))
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
        last = plan.prefill[-1].request_id  # its rows are the plan's last ones
        if excess >= above.packed - total or excess >= sum(c.length for c in plan.prefill if c.request_id == last):
            return  # padding up wastes less, or the cut would take the whole prompt
        trimmed = list(plan.prefill)
        while excess:
            chunk = trimmed.pop()
            if chunk.length > excess:
                trimmed.append(self._chunk(self._by_id[last], chunk.start, chunk.length - excess, first=chunk.first))
                break
            excess -= chunk.length
        if self.buckets.prefill_bucket(len(trimmed), max(c.length for c in trimmed), below) is not None:
            plan.prefill[:] = trimmed

    def _reserve_or_preempt(self, seq: SequenceState, length: int, plan: Schedule) -> bool:
        while not self.kv.allocate(seq.held, seq.num_computed + length):
            victim = self.running[-1]  # the newest running sequence gives way
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: SequenceState, plan: Schedule) -> None:
        self.running.remove(seq)
        for chunks in (plan.decode, plan.prefill):
            chunks[:] = [c for c in chunks if c.request_id != seq.request_id]
        self._drop_resources(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        # Back to the head of the queue, still ahead of everything that arrived after it.
        index = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)
        self.num_preemptions += 1

    def _drop_resources(self, seq: SequenceState, pin_session: str | None = None) -> None:
        self.kv.free(seq.held, seq.token_ids, pin_session)
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1


def counts_generated(config: GenerationConfig) -> bool:
    """Whether a request's sampler rows need its generated-token counts (presence or frequency penalty)."""
    return config.presence_penalty != 0 or config.frequency_penalty != 0


def _may_reuse_cache(config: GenerationConfig) -> bool:
    """Cached pages skip the step, so a request whose sampler must see every token it has (repetition
    penalty: prompt and output; presence and frequency penalties: output after a preemption) or whose
    prompt positions each need logits (prompt logprobs) computes its prompt in full."""
    return config.repetition_penalty == 1.0 and not counts_generated(config) and config.prompt_logprobs is None


def _logprob(logprobs: StepLogprobsHost, row: int, top: int) -> TokenLogprob:
    """Row `row`'s entry of a step's log probabilities, with its `top` most likely tokens."""
    top_ids, top_values = logprobs.top_ids[row, :top].tolist(), logprobs.top_logprobs[row, :top].tolist()
    return TokenLogprob(int(logprobs.token_ids[row]), float(logprobs.logprobs[row]),
                        tuple(zip(top_ids, top_values, strict=True)))


class StepLogprobsHost(Protocol):
    """`sampling.StepLogprobs` read back to the host (numpy arrays)."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def _output(seq: SequenceState, new_tokens: list[int], reason: FinishReason | None = None,
            error: str | None = None) -> EngineOutput:
    return EngineOutput(request_id=seq.request_id, new_token_ids=new_tokens, finished=reason is not None,
                        finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
                        num_cached_tokens=seq.num_cached_tokens, error=error)
