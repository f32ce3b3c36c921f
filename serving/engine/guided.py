"""Structured output in the engine: each constrained row's allowed tokens, applied to its logits in the step.

Regular constraints (`TokenAutomaton`) run on the device. Their tables live in one pool (`GuidePool`),
several grammars side by side at their own state offsets: a packed bitmask of the allowed tokens per
state (u32[states, ceil(V/32)]) and a next-state table folded by token class. Each slot's automaton
state is device state like its last token: the step masks a row's logits with its state's bits, the
sampler draws, and `advance` moves the state by the drawn token, all on the device, so a constrained row
costs no host round trip and keeps the overlapped loop. An unconstrained row's state is `NONE`, whose
bits allow everything; a batch without constrained rows runs none of this.

Other constraints (`HostGrammar`: llguidance grammars, or an automaton sent to the host) fill their
rows' bitmasks on the host and hand them to the step as an input. The host must have read a row's last
token first, so the scheduler leaves such a row out of the step after the one that sampled it
(`EngineRequest.guided_on_host`); its mask is filled while the device runs the other rows' step.

Each step's row table carries one column per row (`column`): a state to start from (>= 0: the row's
first sample since admission, with the state after any tokens it generated before a preemption, or
NONE), `DEVICE` (use the slot's device state), or `HOST` (use the host bitmask).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from serving.engine.program_store import Programs, ProgramStore
from serving.request import EngineRequest, HostGrammar, TokenAutomaton

DEVICE, HOST = -1, -2  # column values besides a start state
POOL_GRAMMARS = 64  # grammars resident at once
ENTRIES_PER_STATE = 256  # next-state entries per pool state, on average (a grammar uses states x classes)


def bitmask_width(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def pack_allowed(allowed: np.ndarray) -> np.ndarray:
    """bool[N, V] -> u32[N, ceil(V/32)]: bit j of word w is token 32w + j."""
    rows, vocab = allowed.shape
    padded = np.zeros((rows, bitmask_width(vocab) * 32), bool)
    padded[:, :vocab] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view("<u4")


def automaton_bits(automaton: TokenAutomaton) -> np.ndarray:
    """u32[S, W]: the allowed tokens of every state."""
    return pack_allowed(automaton.transitions[:, automaton.token_class] >= 0)


# ----- inside jit -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowColumns:
    """Where a step's row table keeps the fields guided decoding reads (static)."""

    slot: int
    samples: int
    guide: int


def row_states(state: jax.Array, row_table: jax.Array, cols: RowColumns, none: int) -> jax.Array:
    """i32[B]: each row's automaton state this step (NONE for host-masked and unconstrained rows)."""
    column = row_table[:, cols.guide]
    slots = jnp.minimum(row_table[:, cols.slot], state.shape[0] - 1)  # padding rows point past the table
    current = jnp.where(column >= 0, column, state[slots])
    return jnp.where(column == HOST, none, current)


def unpack_bits(bits: jax.Array, vocab: int) -> jax.Array:
    """u32[B, W] -> bool[B, vocab]."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    return (((bits[:, :, None] >> shifts) & 1) > 0).reshape(bits.shape[0], -1)[:, :vocab]


def mask_logits(logits: jax.Array, state: jax.Array, row_table: jax.Array, pool_bits: jax.Array,
                host_bits: jax.Array | None, *, cols: RowColumns) -> jax.Array:
    """Logits with every token the row's constraint forbids at -inf."""
    none = pool_bits.shape[0] - 2
    bits = pool_bits[row_states(state, row_table, cols, none)]
    if host_bits is not None:
        bits = jnp.where((row_table[:, cols.guide] == HOST)[:, None], host_bits, bits)
    return jnp.where(unpack_bits(bits, logits.shape[1]), logits, -jnp.inf)


def advance(state: jax.Array, tokens: jax.Array, row_table: jax.Array, row_start: jax.Array, grammar_of: jax.Array,
            class_of: jax.Array, transitions: jax.Array, *, cols: RowColumns) -> jax.Array:
    """The slots' states after this step's sampled tokens (rows that sample only)."""
    none = row_start.shape[0] - 2
    current = row_states(state, row_table, cols, none)
    token_class = class_of[grammar_of[current], tokens]
    following = transitions[row_start[current] + token_class]
    target = jnp.where(row_table[:, cols.samples] > 0, row_table[:, cols.slot], state.shape[0])
    return state.at[target].set(following, mode="drop")


# ----- the pool ---------------------------------------------------------------------------------------
@dataclass
class _Resident:
    states: slice
    entries: slice
    grammar: int
    refs: int = 0


class GuidePool:
    """Device tables of the resident automata, with host mirrors; least recently used grammars that no
    running row holds make room for new ones. State ids are global: a grammar's state s is start + s."""

    def __init__(self, vocab_size: int, max_states: int, sharding: NamedSharding,
                 max_grammars: int = POOL_GRAMMARS, entries_per_state: int = ENTRIES_PER_STATE):
        self.vocab_size, self.max_states, self.sharding = vocab_size, max_states, sharding
        self.max_entries, self.max_grammars = max_states * entries_per_state, max_grammars
        self.none, self.dead = max_states, max_states + 1  # sentinel states: allow all, allow nothing
        width = bitmask_width(vocab_size)
        self.bits = np.zeros((max_states + 2, width), np.uint32)
        self.bits[self.none] = 0xFFFFFFFF
        self.row_start = np.zeros(max_states + 2, np.int32)
        self.row_start[[self.none, self.dead]] = [self.max_entries, self.max_entries + 1]
        self.grammar_of = np.full(max_states + 2, max_grammars, np.int32)  # the last class row: all class 0
        self.class_of = np.zeros((max_grammars + 1, vocab_size), np.int32)
        self.transitions = np.zeros(self.max_entries + 2, np.int32)
        self.transitions[[self.max_entries, self.max_entries + 1]] = [self.none, self.dead]
        self.resident: OrderedDict[str, _Resident] = OrderedDict()
        self._device: tuple[jax.Array, ...] | None = None

    def acquire(self, automaton: TokenAutomaton) -> int | None:
        """The pool offset of `automaton`'s states, installing it if needed; None if it cannot fit."""
        entry = self.resident.get(automaton.key)
        if entry is None:
            entry = self._install(automaton)
            if entry is None:
                return None
        self.resident.move_to_end(automaton.key)
        entry.refs += 1
        return entry.states.start

    def release(self, key: str) -> None:
        self.resident[key].refs -= 1

    def device_tables(self) -> tuple[jax.Array, ...]:
        """(bits, row_start, grammar_of, class_of, transitions) on the device, uploaded after a change."""
        if self._device is None:
            self._device = tuple(jax.device_put(a, self.sharding) for a in
                                 (self.bits, self.row_start, self.grammar_of, self.class_of, self.transitions))
        return self._device

    def _install(self, automaton: TokenAutomaton) -> _Resident | None:
        states, classes = automaton.transitions.shape
        if states > self.max_states or states * classes > self.max_entries:
            return None
        while True:
            place = self._free_place(states, states * classes)
            if place is not None:
                break
            victim = next((key for key, r in self.resident.items() if r.refs == 0), None)
            if victim is None:
                return None
            del self.resident[victim]
        state_start, entry_start, grammar = place
        entry = _Resident(slice(state_start, state_start + states), slice(entry_start, entry_start + states * classes),
                          grammar)
        self.bits[entry.states] = automaton_bits(automaton)
        self.row_start[entry.states] = entry_start + classes * np.arange(states, dtype=np.int32)
        self.grammar_of[entry.states] = grammar
        self.class_of[grammar] = automaton.token_class
        table = automaton.transitions
        self.transitions[entry.entries] = np.where(table >= 0, table + state_start, self.dead).reshape(-1)
        self.resident[automaton.key] = entry
        self._device = None
        return entry

    def _free_place(self, states: int, entries: int) -> tuple[int, int, int] | None:
        used_grammars = {r.grammar for r in self.resident.values()}
        grammar = next((g for g in range(self.max_grammars) if g not in used_grammars), None)
        state_start = _first_fit([r.states for r in self.resident.values()], states, self.max_states)
        entry_start = _first_fit([r.entries for r in self.resident.values()], entries, self.max_entries)
        if grammar is None or state_start is None or entry_start is None:
            return None
        return state_start, entry_start, grammar


def _first_fit(taken: list[slice], size: int, limit: int) -> int | None:
    start = 0
    for used in sorted(taken, key=lambda s: s.start):
        if used.start - start >= size:
            return start
        start = max(start, used.stop)
    return start if limit - start >= size else None


# ----- host-side matchers -----------------------------------------------------------------------------
class AutomatonMatcher:
    """A `TokenAutomaton` run on the host: its masks from the same tables the device uses."""

    def __init__(self, automaton: TokenAutomaton):
        self.automaton = automaton
        self.state = automaton.initial

    def fill(self, out: np.ndarray) -> None:
        allowed = self.automaton.transitions[self.state, self.automaton.token_class] >= 0 if self.state >= 0 else \
            np.zeros(len(self.automaton.token_class), bool)
        out[:] = pack_allowed(allowed[None])[0]

    def consume(self, token: int) -> None:
        if self.state >= 0:
            self.state = int(self.automaton.transitions[self.state, self.automaton.token_class[token]])


class LLGuidanceMatcher:
    """An llguidance grammar; its end tokens are the request's stop ids, allowed exactly where it accepts."""

    def __init__(self, ll_tokenizer: Any, grammar: HostGrammar):
        import llguidance

        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar.source)
        self.end_ids = np.array(sorted(grammar.end_ids), np.int64)
        self.own_ends = np.array(ll_tokenizer.eos_tokens, np.int64)

    def fill(self, out: np.ndarray) -> None:
        import llguidance.numpy

        row = out.view(np.int32)[None]
        llguidance.numpy.fill_next_token_bitmask(self.matcher, row, 0)
        _set_bits(out, self.own_ends, False)
        _set_bits(out, self.end_ids, self.matcher.is_accepting())

    def consume(self, token: int) -> None:
        if token not in self.end_ids:
            self.matcher.consume_token(token)


def _set_bits(words: np.ndarray, tokens: np.ndarray, on: bool) -> None:
    bit = (np.uint32(1) << (tokens % 32).astype(np.uint32))
    for word, b in zip(tokens // 32, bit, strict=True):
        words[word] = words[word] | b if on else words[word] & ~b


# ----- per step ---------------------------------------------------------------------------------------
@dataclass
class _SlotGuide:
    """The guide of the request a slot holds (this admission of it)."""

    request: EngineRequest
    admission: int
    offset: int | None = None  # device path: its grammar's place in the pool
    matcher: AutomatonMatcher | LLGuidanceMatcher | None = None  # host path
    started: bool = False  # its first sampling row has gone out
    generated: list[int] = field(default_factory=list)  # tokens it had generated before this admission


class GuidedDecoding:
    """The runner's side of structured output: per-slot guides, the step's column and host bitmasks, and the
    compiled mask and advance programs (per row count, compiled at start-up)."""

    def __init__(self, vocab_size: int, num_slots: int, cols: RowColumns, sharding: NamedSharding,
                 max_states: int, tokenizer: Any = None, program_store: ProgramStore | None = None):
        self.vocab_size, self.num_slots, self.cols = vocab_size, num_slots, cols
        self.pool = GuidePool(vocab_size, max_states, sharding)
        self.tokenizer = tokenizer  # serving.text.tokenizer.Tokenizer, for llguidance grammars
        self._ll_tokenizer = None
        self.state = jax.jit(lambda: jnp.full((num_slots,), max_states, jnp.int32), out_shardings=sharding)()
        self.slots: dict[int, _SlotGuide] = {}
        # Called by (rows, whether host bitmasks come) and rows: see `compile_for`.
        self._mask = Programs(jax.jit(functools.partial(mask_logits, cols=cols), out_shardings=sharding),
                              "guided_mask", program_store)
        self._advance = Programs(jax.jit(functools.partial(advance, cols=cols), donate_argnums=(0,),
                                         out_shardings=sharding), "guided_advance", program_store)
        self._host_bits: np.ndarray | None = None  # this step's, when a row is masked on the host
        self._guided = False  # this step has a constrained row
        self.host_rows = self.device_rows = 0  # constrained rows dispatched, per path

    @property
    def none(self) -> int:
        return self.pool.none

    def column(self, chunks: list[Any], rows: int) -> np.ndarray:
        """i32[rows]: the guide column of a step's row table; prepares its host bitmasks."""
        column = np.full(rows, self.none, np.int32)
        host_bits = None
        self._guided = False
        for r, chunk in enumerate(chunks):
            guide = self._slot_guide(chunk)
            if guide is None:
                continue
            if not guide.started and chunk.token_ids and \
                    chunk.start + chunk.length > len(guide.request.prompt_token_ids):
                prompt = len(guide.request.prompt_token_ids)
                guide.generated += chunk.token_ids[max(prompt - chunk.start, 0):]
            if not chunk.samples:
                continue
            self._guided = True
            if guide.matcher is not None:
                if not guide.started:
                    for token in guide.generated[: chunk.step]:
                        guide.matcher.consume(token)
                if host_bits is None:
                    host_bits = np.zeros((rows, bitmask_width(self.vocab_size)), np.uint32)
                guide.matcher.fill(host_bits[r])
                column[r] = HOST
                self.host_rows += 1
            else:
                automaton = guide.request.guide
                state = automaton.walk(guide.generated[: chunk.step]) if not guide.started else DEVICE
                column[r] = state if state == DEVICE else (self.pool.dead if state < 0 else guide.offset + state)
                self.device_rows += 1
            guide.started = True
        self._host_bits = host_bits
        return column

    def mask(self, logits: jax.Array, row_table: jax.Array) -> jax.Array:
        """The step's logits with its constrained rows masked (unchanged when it has none)."""
        if not self._guided:
            return logits
        return self._mask((len(row_table), self._host_bits is not None), logits, self.state, row_table,
                          self.pool.device_tables()[0], self._host_bits)

    def advance(self, tokens: jax.Array, row_table: jax.Array) -> None:
        if self._guided:
            self.state = self._advance(len(row_table), self.state, tokens, row_table, *self.pool.device_tables()[1:])

    def observe(self, chunks: list[Any], tokens: list[int]) -> None:
        """A read-back step's tokens, for the host-side matchers."""
        for chunk, token in zip(chunks, tokens, strict=False):
            guide = self.slots.get(chunk.slot)
            if chunk.samples and guide is not None and guide.matcher is not None and \
                    guide.request is chunk.request and guide.admission == chunk.admission:
                guide.matcher.consume(token)

    def compile_for(self, rows: int, row_table: np.ndarray) -> None:
        """Compile, without running them, the mask (both variants) and advance programs for this row count.
        Only shapes are read, never the device state: start-up calls this on its own threads while steps run."""
        def spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(dtype), sharding=self.pool.sharding)

        pool = self.pool
        tables = [spec(a.shape, a.dtype) for a in (pool.bits, pool.row_start, pool.grammar_of, pool.class_of,
                                                   pool.transitions)]
        logits, state = spec((rows, self.vocab_size), np.float32), spec((self.num_slots,), np.int32)
        self._mask.compile((rows, False), logits, state, row_table, tables[0], None)
        self._mask.compile((rows, True), logits, state, row_table, tables[0],
                           np.zeros((rows, bitmask_width(self.vocab_size)), np.uint32))
        self._advance.compile(rows, state, spec((rows,), np.int32), row_table, *tables[1:])

    def _slot_guide(self, chunk: Any) -> _SlotGuide | None:
        """The slot's guide, set up anew when the slot has a new request or admission."""
        guide = self.slots.get(chunk.slot)
        if guide is not None and guide.request is chunk.request and guide.admission == chunk.admission:
            return guide
        if guide is not None:
            self._drop(chunk.slot)
        request = chunk.request
        if request.guide is None:
            return None
        guide = _SlotGuide(request, chunk.admission)
        if isinstance(request.guide, TokenAutomaton):
            guide.offset = self.pool.acquire(request.guide)
            if guide.offset is None:  # the pool is full of grammars in use: the same automaton, on the host
                guide.matcher = AutomatonMatcher(request.guide)
                request.masked_on_host = True
        elif request.guide.automaton is not None:
            guide.matcher = AutomatonMatcher(request.guide.automaton)
        else:
            guide.matcher = LLGuidanceMatcher(self._llguidance_tokenizer(), request.guide)
        self.slots[chunk.slot] = guide
        return guide

    def _drop(self, slot: int) -> None:
        guide = self.slots.pop(slot)
        if guide.offset is not None:
            self.pool.release(guide.request.guide.key)

    def _llguidance_tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer.hf_tokenizer, n_vocab=self.vocab_size)
        return self._ll_tokenizer
