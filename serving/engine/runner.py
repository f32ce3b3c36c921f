"""The device side of the engine: model weights, the paged KV cache, and one jitted step per bucket.

A step takes a padded `[B, T]` batch of token chunks (see `scheduler.Chunk`), writes their keys and
values into the cache, and samples one token per row from the logits at each row's last token. The
same function serves decode (`T == 1`) and prefill; it is compiled ahead of time for every bucket shape
at start-up (`startup_units`, compiled by `warmup` without running them, or loaded from disk by
`program_store`) and called by its bucket's key, so serving never triggers a compilation.
With the Pallas kernels, decode buckets also get a shared-prefix variant: the host groups rows that share
leading pages into tiles (`xlkernels.shared_prefix`), and a step with at least one tile runs that variant.
Only the per-sequence device state is donated — the cache, the "seen tokens" table (repetition
penalty) and each sequence's last sampled token — and it is rebound after every call: updated in
place, never copied. Because a decoding row reads its input token from that state, the engine can
dispatch step k+1 before it has read step k's tokens back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.llama import AttentionBatch, CausalLM, LayerCache, empty_cache
from model.weight_quant import compiler_options
from serving.engine.columns import Columns
from serving.engine.config import BucketSet, StepShape
from serving.engine.guided import GuidedDecoding, RowColumns
from serving.engine.pages import NULL_PAGE
from serving.engine.program_store import Programs, ProgramStore
from serving.engine.sampling import (
    SEARCH,
    Extended,
    ExtendedRows,
    SamplingTable,
    StepLogprobs,
    count_generated,
    sample,
    sample_extended,
    sample_mode,
    sample_modes,
    unpack_sampling,
)
from serving.engine.scheduler import Chunk
from serving.engine.warmup import BucketCompiler, CompileUnit
from serving.request import EngineRequest
from xlkernels import is_pallas
from xlkernels.shared_prefix import MIN_PLAN_BATCH, SharedPrefix, max_tiles_for, plan_shared_prefix, tile_size_for

logger = logging.getLogger(__name__)

# The sampler branch compiled with each bucket: it covers every row (`sampling.sample`), so a step may take it
# while the cheaper branches of its row count are still compiling.
GENERAL_MODE = SEARCH


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array  # i32[B, T]
    valid: jax.Array  # bool[B, T] each row's real tokens
    attn: AttentionBatch  # in the model's row order (`model_rows`)
    last_index: jax.Array  # i32[B] index in T of each row's last real token (its logits are sampled)
    slots: jax.Array  # i32[B] row of the per-sequence tables; padding rows point past their end
    reset: jax.Array  # bool[B] a sequence's first chunk since admission: clear its seen-tokens row first
    from_device: jax.Array  # bool[B] the row's first token is still on the device: last_tokens[slot]
    samples: jax.Array  # bool[B] the row reaches its sequence's end: its sampled token is real
    # A mixed step's rows reordered for the model (None: the same order): the step's row at each of the model's
    # rows, and the model's row holding each of the step's rows (`unpack_step`).
    model_rows: jax.Array | None = None  # i32[B]
    step_rows: jax.Array | None = None  # i32[B]


# A step's rows cross to the device as one i32 matrix (see `columns`): these fields, then the row's block
# table. `tile`, `tile_slot` and `tile_start` are a decode row's shared-prefix plan (row_tile, row_slot,
# row_start of `xlkernels.shared_prefix`), read only by the shared-prefix variant of the step.
ROW_FIELDS = Columns(slot=1, start=1, length=1, from_device=1, samples=1, reset=1, tile=1, tile_slot=1, tile_start=1,
                     guide=1)  # guide: the row's structured-output state (`guided.GuidedDecoding.column`)
_SLOT, _SAMPLES = ROW_FIELDS.index("slot"), ROW_FIELDS.index("samples")
_GUIDE_COLUMNS = RowColumns(slot=_SLOT, samples=_SAMPLES, guide=ROW_FIELDS.index("guide"))
# The fields a chunk sets, one slice for the hot loop of `ModelRunner._inputs`.
_PER_CHUNK = slice(_SLOT, ROW_FIELDS.index("reset") + 1)


def unpack_step(token_grid: jax.Array, row_table: jax.Array, tile_size: int | None = None,
                packed: int | None = None, decode: int = 0) -> StepInputs:
    """StepInputs from the i32[B, T] token grid and the i32[B, ROW_FIELDS.width + pages_per_seq] row table.

    tile_size: also unpack the rows' shared-prefix plan (decode only), in tiles of up to this many rows.
    packed: the model computes this many tokens, the valid ones end to end (see `AttentionBatch.packed_index`).
    decode: a mixed step's decoding rows. Its rows are the plan's: decoding rows first, then prompt chunks,
    then padding. The leading rows of one token (at most `decode`; a prompt's last token or a logprob
    position is a decoding row in all but name) attend as a [decode, 1] batch of their own
    (`AttentionBatch.decode`, padded with empty rows), their tokens at the head of the `packed` stream; the
    model sees the rows after them as its other `B - decode` rows (`model_rows`), so no row is laid out twice.
    """
    row = ROW_FIELDS.unpack(row_table)
    starts, lengths = row["start"], row["length"]
    tables = row_table[:, ROW_FIELDS.width:]
    num_rows, tokens = token_grid.shape
    valid = jnp.arange(tokens, dtype=jnp.int32) < lengths[:, None]
    shared = model_rows = step_rows = None
    if tile_size is not None:
        shared = SharedPrefix.from_rows(row["tile"], row["tile_slot"], row["tile_start"],
                                        num_tiles=max_tiles_for(num_rows), tile_size=tile_size)
    if not decode:
        attn = _rows_batch(starts, lengths, tables, tokens, shared, packed)
    else:
        index = jnp.arange(num_rows, dtype=jnp.int32)
        decoding = jnp.cumprod((index < decode) & (lengths == 1)).astype(bool)  # the leading one-token rows
        first_prompt = jnp.sum(decoding, dtype=jnp.int32)
        model_rows = jnp.concatenate([index[:decode], first_prompt + index[: num_rows - decode]])
        step_rows = jnp.minimum(jnp.where(decoding, index, decode + index - first_prompt), num_rows - 1)
        prompt = model_rows[decode:]
        attn = _rows_batch(starts[prompt], lengths[prompt], tables[prompt], tokens, None, packed - decode)
        decode_rows = _rows_batch(jnp.where(decoding, starts, 0)[:decode], decoding[:decode].astype(jnp.int32),
                                  tables[:decode], 1)  # a row that is not decoding is empty from position 0
        attn = dataclasses.replace(attn, decode=decode_rows)
    return StepInputs(tokens=token_grid, valid=valid, attn=attn, last_index=jnp.maximum(lengths - 1, 0),
                      slots=row["slot"], reset=row["reset"] > 0, from_device=row["from_device"] > 0,
                      samples=row["samples"] > 0, model_rows=model_rows, step_rows=step_rows)


def _rows_batch(starts: jax.Array, lengths: jax.Array, tables: jax.Array, tokens: int,
                shared: SharedPrefix | None = None, packed: int | None = None) -> AttentionBatch:
    """The AttentionBatch of rows of up to `tokens` tokens from `starts`, `lengths` tokens each; `packed`:
    their valid tokens packed into a stream of this many (`AttentionBatch.packed_index`)."""
    offsets = jnp.arange(tokens, dtype=jnp.int32)
    valid = offsets < lengths[:, None]
    packed_index = None
    if packed is not None:
        packed_index = jnp.nonzero(valid.reshape(-1), size=packed, fill_value=valid.size)[0].astype(jnp.int32)
    return AttentionBatch(positions=starts[:, None] + offsets, valid=valid, kv_lens=starts + lengths,
                          block_tables=tables, shared=shared, packed_index=packed_index)


def step(
    model: CausalLM,
    params: dict,
    cache: list[LayerCache],
    seen: jax.Array,  # bool[num_slots, V] tokens each running sequence has had (repetition penalty)
    last_tokens: jax.Array,  # i32[num_slots] each sequence's latest sampled token
    token_grid: jax.Array,  # i32[B, T]
    row_table: jax.Array,  # i32[B, ROW_FIELDS.width + pages_per_seq]
    *,
    shared_prefix: bool = False,  # static: a decode step whose rows carry a shared-prefix plan
    packed: int | None = None,  # static: the model computes this many packed tokens (unpack_step)
    decode: int = 0,  # static: a mixed step's leading decoding rows (unpack_step)
) -> tuple[list[LayerCache], jax.Array, jax.Array, jax.Array, jax.Array]:
    """Run the model over the batch and record its tokens as seen.

    A decoding row's input is the token the previous step sampled, which the host may not have read
    yet: it comes from `last_tokens`, so the host can dispatch this step before reading the last.
    Returns the new cache, the new seen table, f32[B, V] logits at each row's last token, each row's
    bool[B, V] seen tokens (the sampler's repetition-penalty input) and [B, E] the hidden state the LM head
    read there (an embedding request's answer; copied to the host only when a row asks, `ModelRunner.run`).
    """
    tile_size = tile_size_for(model.config.q_per_kv, token_grid.shape[0]) if shared_prefix else None
    inputs = unpack_step(token_grid, row_table, tile_size, packed, decode)
    num_slots = seen.shape[0]
    slots = jnp.minimum(inputs.slots, num_slots - 1)
    first = jnp.where(inputs.from_device, last_tokens[slots], inputs.tokens[:, 0])
    tokens = inputs.tokens.at[:, 0].set(first)
    if inputs.model_rows is None:
        logits, cache, hidden = model.apply({"params": params}, tokens, inputs.attn, cache, inputs.last_index,
                                            with_hidden=True)
    else:  # a mixed step: the model's row order in, the step's out
        logits, cache, hidden = model.apply({"params": params}, tokens[inputs.model_rows], inputs.attn, cache,
                                            inputs.last_index[inputs.model_rows], with_hidden=True)
        logits, hidden = logits[inputs.step_rows], hidden[inputs.step_rows]
    seen = seen.at[jnp.where(inputs.reset, inputs.slots, num_slots)].set(False, mode="drop")
    token_slots = jnp.where(inputs.valid, inputs.slots[:, None], num_slots)
    seen = seen.at[token_slots, tokens].set(True, mode="drop")
    return cache, seen, logits, seen[slots], hidden


def sample_and_record(
    logits: jax.Array,  # f32[B, V]
    sampling_ints: jax.Array,  # i32[B, SAMPLING_INTS.width]
    sampling_floats: jax.Array,  # f32[B, SAMPLING_FLOATS.width]
    seen_rows: jax.Array,  # bool[B, V]
    last_tokens: jax.Array,  # i32[num_slots]
    row_table: jax.Array,  # i32[B, ROW_FIELDS.width + pages_per_seq]
    mode: int,  # static: the sampler branch (sampling.sample_mode)
) -> tuple[jax.Array, jax.Array]:  # i32[B] sampled tokens, updated last_tokens
    tokens = sample(logits, unpack_sampling(sampling_ints, sampling_floats), seen_rows, mode)
    # Only rows that reach their sequence's end record a token; prompt chunks and padding drop.
    target = jnp.where(row_table[:, _SAMPLES] > 0, row_table[:, _SLOT], last_tokens.shape[0])
    return tokens, last_tokens.at[target].set(tokens, mode="drop")


def sample_extended_and_record(
    logits: jax.Array,  # f32[B, V]
    sampling_ints: jax.Array,  # i32[B, SAMPLING_INTS.width]
    sampling_floats: jax.Array,  # f32[B, SAMPLING_FLOATS.width]
    seen_rows: jax.Array,  # bool[B, V]
    last_tokens: jax.Array,  # i32[num_slots]
    counts: jax.Array,  # i32[num_slots, V] generated-token counts
    row_table: jax.Array,  # i32[B, ROW_FIELDS.width + pages_per_seq]
    rows: ExtendedRows,  # of jax arrays: bias, prompt lengths, targets
    first_tokens: jax.Array,  # i32[B] each row's first input token (when it came from the host)
    raw_logprobs: bool,  # static: --logprobs-mode raw
) -> tuple[jax.Array, jax.Array, jax.Array, StepLogprobs]:
    """`sample_and_record` for a step with a row that uses penalties over generated tokens, logit bias or
    log probabilities (`sampling.EXTENDED`): also updates the counts, and returns the step's log probabilities."""
    row = ROW_FIELDS.unpack(row_table[:, : ROW_FIELDS.width])
    num_slots = last_tokens.shape[0]
    slots = row["slot"]
    first = jnp.where(row["from_device"] > 0, last_tokens[jnp.minimum(slots, num_slots - 1)], first_tokens)
    counts = count_generated(counts, slots, row["reset"] > 0, first, row["start"], row["length"], rows.prompt_len)
    extended = Extended(counts[jnp.minimum(slots, num_slots - 1)], rows.bias_ids, rows.bias_values, rows.targets)
    tokens, logprobs = sample_extended(logits, unpack_sampling(sampling_ints, sampling_floats), seen_rows, extended,
                                       raw_logprobs)
    target = jnp.where(row["samples"] > 0, slots, num_slots)
    return tokens, last_tokens.at[target].set(tokens, mode="drop"), counts, logprobs


@dataclass(frozen=True)
class StepOutput:
    """A dispatched step's results, still on the device: the sampled tokens, and the log probabilities and
    hidden states when a row of the step asked for them (None otherwise: nothing more is copied to the host)."""

    tokens: jax.Array  # i32[rows]
    logprobs: StepLogprobs | None = None
    hidden: jax.Array | None = None  # [rows, E] at each row's last token, for an embedding request's row


def wants_hidden(chunk: Chunk) -> bool:
    """Whether a chunk's row answers an embedding request: the last chunk of its prompt."""
    return chunk.samples and chunk.request.embed


def wants_logprobs(chunk: Chunk) -> bool:
    """Whether a chunk's row reports a log probability: a prompt position's, or its sampled token's."""
    return chunk.target >= 0 or (chunk.samples and chunk.request.config.logprobs is not None)


def _packed(rows: int, tokens: int, packed: int | None, decode: int = 0) -> int | None:
    """The step's static `packed` argument: None when its matmuls run over the whole [rows, tokens] layout."""
    return None if packed is None or (packed == rows * tokens and not decode) else packed


class SlotTables:
    """Host copies of per-sequence step inputs, one row per slot, so a step's inputs are numpy
    gathers over the batch's slots rather than Python work per row. The extra last row belongs to
    padding: null pages, greedy sampling."""

    def __init__(self, num_slots: int, pages_per_seq: int):
        rows = num_slots + 1
        self.owner: list[tuple[EngineRequest, int] | None] = [None] * rows  # (request, its admission)
        self.block_tables = np.full((rows, pages_per_seq), NULL_PAGE, np.int32)
        self.num_pages = np.zeros(rows, np.int32)
        self.sampling = SamplingTable(rows)  # each slot's sampling row at step 0

    def sync(self, chunk: Chunk) -> None:
        """Bring the slot's row up to date with `chunk`'s sequence (a new owner, or pages added since)."""
        slot, owner = chunk.slot, self.owner[chunk.slot]
        if owner is None or owner[0] is not chunk.request or owner[1] != chunk.admission:
            self.owner[slot] = (chunk.request, chunk.admission)
            self.num_pages[slot] = 0
            self.sampling.write(slot, chunk.request)
        have, pages = self.num_pages[slot], chunk.pages
        if have != len(pages):
            self.block_tables[slot, have : len(pages)] = pages[have:]
            self.num_pages[slot] = len(pages)


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        dtype: jnp.dtype,
        num_pages: int,
        page_size: int,
        pages_per_seq: int,
        buckets: BucketSet,
        num_slots: int,
        mesh: Mesh,
        attention_backend: str = "xla",
        shared_prefix_attention: bool = True,
        logprobs_mode: str = "raw",
        guided_states: int = 2048,  # EngineConfig.guided_decoding_states
        tokenizer: object = None,
        kv_format: str | None = None,  # quantized KV pages (xlkernels.kv_quant): int8, int4, fp8; None: `kv_dtype`
        kv_dtype: jnp.dtype | None = None,  # plain pages' dtype (engine.kv_page_dtype); None: `dtype`
        program_dir: str | None = None,  # where compiled programs are loaded from and saved to (program_store)
    ):
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.config = config
        self.params = params
        self.page_size = page_size
        self.pages_per_seq = pages_per_seq
        self.buckets = buckets
        self.num_slots = num_slots
        self.slots = SlotTables(num_slots, pages_per_seq)
        # Plan shared-prefix tiles for decode steps: only the Pallas kernels use a plan.
        self.shared_prefix = shared_prefix_attention and is_pallas(attention_backend)
        self.shared_prefix_steps = 0  # decode steps dispatched with at least one tile
        self.shared_prefix_rows = 0  # rows in a tile, summed over those steps
        self.mixed_steps = 0  # steps with decoding rows beside prompt chunks (`unpack_step`'s decode)
        self.warm_steps = 0  # padding-only first runs of compiled buckets (`warm`)
        self.model = CausalLM(config, dtype=dtype, attention_backend=attention_backend, mesh=mesh)
        # Everything the traced functions close over, for the store's key (their arguments' shapes are in it too).
        program_store = ProgramStore.beside_cache(program_dir, repr((
            config, jnp.dtype(dtype).name, num_pages, page_size, pages_per_seq, num_slots, mesh, attention_backend,
            self.shared_prefix, logprobs_mode, guided_states, kv_format, jnp.dtype(kv_dtype).name)))
        self.program_store = program_store
        self.cache = empty_cache(config, num_pages, page_size, kv_dtype, mesh, kv_format)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.seen = jax.jit(lambda: jnp.zeros((num_slots, config.vocab_size), jnp.bool_),
                            out_shardings=replicated)()
        self.last_tokens = jax.jit(lambda: jnp.zeros((num_slots,), jnp.int32), out_shardings=replicated)()
        # Generated-token counts for presence and frequency penalties: read and written only by steps that
        # run the EXTENDED sampler (`sampling.count_generated`).
        self.counts = jax.jit(lambda: jnp.zeros((num_slots, config.vocab_size), jnp.int32),
                              out_shardings=replicated)()
        self.guided = GuidedDecoding(config.vocab_size, num_slots, _GUIDE_COLUMNS, replicated, guided_states, tokenizer,
                                     program_store)
        # Logits leave the step whole (gathered across a vocab-split LM head) for the sampler, which is
        # a program of its own: it compiles once per row count instead of once per [rows, tokens] shape.
        cache_shardings = jax.tree.map(lambda x: x.sharding, self.cache)
        # Two programs per eligible decode bucket: a step with no tile planned runs the plain kernels,
        # so batches without sharing pay nothing for the prefix pass.
        # Each program is called by its bucket's key: a step by (rows, tokens, packed, decode), a sampler by its
        # rows (and branch), so a call looks up its compiled program without tracing anything.
        self._step, self._shared_step = (
            Programs(jax.jit(functools.partial(step, self.model, shared_prefix=shared_prefix), donate_argnums=(1, 2),
                             static_argnames=("packed", "decode"),
                             out_shardings=(cache_shardings, replicated, replicated, replicated, replicated)),
                     name, program_store)
            for shared_prefix, name in ((False, "step"), (True, "shared_prefix_step"))
        )
        self._sample = Programs(jax.jit(sample_and_record, static_argnums=(6,), in_shardings=replicated,
                                        out_shardings=replicated, donate_argnums=(4,)),  # last_tokens
                                "sample", program_store, static_args=1)
        self._sample_extended = Programs(jax.jit(
            functools.partial(sample_extended_and_record, raw_logprobs=logprobs_mode == "raw"),
            in_shardings=replicated, out_shardings=replicated, donate_argnums=(4, 5)),  # last_tokens, counts
            "sample_extended", program_store)
        self._replicated = replicated
        # What start-up compiles from (`startup_units`): the shapes and placements of the device state, so
        # compiling never touches the state itself, which steps donate and rebind meanwhile.
        self._state_specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                         (self.params, self.cache, self.seen, self.last_tokens, self.counts))
        self._sampler_modes: dict[int, frozenset[int]] = {}  # row count -> sampler branches compiled for it
        self._modes_lock = threading.Lock()

    # ----- start-up ---------------------------------------------------------------------------------
    def startup_units(self) -> list[CompileUnit]:
        """What start-up compiles, one unit per bucket, the essential ones first (`BucketSet.essential_shapes`):
        a bucket's step (and its shared-prefix variant), the general sampler branch and the extended sampler for
        its row count (a step needs one of them) and the structured-output programs for it; then the other
        sampler branches, which steps take once compiled
        (each row's token is the same in every branch that covers it, `sampling.sample`)."""
        essential = self.buckets.essential_shapes()
        shapes = essential + [s for s in self.buckets.shapes() if s not in essential]
        units, row_counts = [], []
        for shape in shapes:
            programs = [functools.partial(self._compile_step, shape, False)]
            if self.plans_shared_prefix(shape.rows, shape.tokens):
                programs.append(functools.partial(self._compile_step, shape, True))
            if shape.rows not in row_counts:
                row_counts.append(shape.rows)
                programs.append(functools.partial(self._compile_sampler, shape.rows, GENERAL_MODE))
                programs.append(functools.partial(self._compile_extended_sampler, shape.rows))
                programs.append(functools.partial(self.guided.compile_for, shape.rows,
                                                  self._padding_inputs(shape.rows, 1)[1]))
            label = (f"[{shape.rows} x {shape.tokens}]" + (f" packed to {shape.packed}" if _packed(*shape) else "")
                     + (f" with {shape.decode} decoding" if shape.decode else ""))
            units.append(CompileUnit(shape, label, tuple(programs)))
        for rows in row_counts:
            modes = [mode for mode in sample_modes(rows) if mode != GENERAL_MODE]
            units.append(CompileUnit(None, f"[{rows} x ·] sampler branches",
                                     tuple(functools.partial(self._compile_sampler, rows, m) for m in modes)))
        return units

    @property
    def num_programs(self) -> int:
        return sum(len(unit.programs) for unit in self.startup_units())

    def compile_all(self, progress: bool = True, on_compiled: Callable[[int, int, str, float], None] | None = None,
                    threads: int | None = None) -> float:
        """Compile every bucket's programs (`startup_units`) on `threads` threads (default: one per core) and
        return the seconds it took. `on_compiled` is called after each unit with its number, the count, its
        label and its programs' compile seconds."""
        def done(unit: CompileUnit, number: int, total: int, seconds: float) -> None:
            if on_compiled is not None:
                on_compiled(number, total, unit.label, seconds)
            if progress:
                logger.info("compiled %d/%d %s (%.1fs)", number, total, unit.label, seconds)

        compiler = BucketCompiler(self.startup_units(), essential=0, threads=threads, on_done=done)
        compiler.start()
        compiler.wait()
        return compiler.seconds

    def _compile_step(self, shape: StepShape, shared_prefix: bool) -> None:
        rows, tokens, packed, decode = shape
        token_ids, row_table, *_ = self._padding_inputs(rows, tokens)
        run_step = self._shared_step if shared_prefix else self._step
        packed = _packed(*shape)
        run_step.compile((rows, tokens, packed, decode), *self._state_specs[:4], token_ids, row_table, packed=packed,
                         decode=decode, compiler_options=self.compiler_options(shape))

    def compiler_options(self, shape: StepShape) -> dict[str, bool]:
        """XLA's options for the step program of `shape`: its matmuls have `shape.packed` rows."""
        return compiler_options(shape.packed, self.config.weight_quant)

    def _sampler_specs(self, rows: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """The step's outputs a sampler reads: f32[rows, V] logits and bool[rows, V] seen tokens."""
        vocab = self.config.vocab_size
        return (jax.ShapeDtypeStruct((rows, vocab), jnp.float32, sharding=self._replicated),
                jax.ShapeDtypeStruct((rows, vocab), jnp.bool_, sharding=self._replicated))

    def _compile_sampler(self, rows: int, mode: int) -> None:
        _, row_table, ints, floats, _ = self._padding_inputs(rows, 1)
        logits, seen_rows = self._sampler_specs(rows)
        self._sample.compile((rows, mode), logits, ints, floats, seen_rows, self._state_specs[3], row_table, mode)
        with self._modes_lock:
            self._sampler_modes = {**self._sampler_modes, rows: self._sampler_modes.get(rows, frozenset()) | {mode}}

    def _compile_extended_sampler(self, rows: int) -> None:
        token_ids, row_table, ints, floats, extended_rows = self._padding_inputs(rows, 1)
        logits, seen_rows = self._sampler_specs(rows)
        self._sample_extended.compile(rows, logits, ints, floats, seen_rows, self._state_specs[3], self._state_specs[4],
                                      row_table, extended_rows, token_ids[:, 0])

    def _sampler_mode(self, rows: int, mode: int) -> int:
        """`mode` if its program is compiled for this row count, else the general branch, which covers it."""
        return mode if mode in self._sampler_modes.get(rows, ()) else GENERAL_MODE

    def _padding_inputs(self, rows: int, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                               ExtendedRows]:
        """A step of padding rows only (token grid, row table, sampling ints and floats, the extended sampler's
        rows), built without touching any per-step state: only its shapes matter, for compiling."""
        fields = np.zeros((rows, ROW_FIELDS.width), np.int32)
        fields[:, _SLOT] = self.num_slots
        fields[:, ROW_FIELDS.index("guide")] = self.guided.none
        tables = np.full((rows, self.pages_per_seq), NULL_PAGE, np.int32)
        padding = np.full(rows, self.num_slots)
        ints, floats = self.slots.sampling.gather(padding, np.zeros(rows, np.int32))
        extended = self.slots.sampling.gather_extended(padding, np.full(rows, -1, np.int32))
        return np.zeros((rows, tokens), np.int32), np.concatenate([fields, tables], axis=1), ints, floats, extended

    def plans_shared_prefix(self, rows: int, tokens: int) -> bool:
        """Whether steps of this bucket get a shared-prefix plan: decode buckets of MIN_PLAN_BATCH rows or more."""
        return self.shared_prefix and tokens == 1 and rows >= MIN_PLAN_BATCH

    # ----- one step ---------------------------------------------------------------------------------
    def run(self, chunks: list[Chunk], rows: int, tokens: int, packed: int | None = None, decode: int = 0
            ) -> StepOutput:
        """Dispatch one step for `chunks` padded to the `[rows, tokens]` bucket; returns its results on device.

        packed: the step's compiled packed token count (`config.StepShape.packed`); None or rows * tokens
        for a step whose matmuls run over the whole layout. decode: a mixed step's decoding rows, which are
        its first `decode` rows (`config.StepShape.decode`: the chunks' first ones, padded to that many).

        The result is not waited for: the caller reads it when it needs the tokens, so the next
        dispatch can go out first. Its log probabilities are copied to the host only when a row asked.
        """
        token_ids, row_table, sampling_ints, sampling_floats, tiled_rows, extended_rows = self._inputs(
            chunks, rows, tokens)
        if tiled_rows:
            self.shared_prefix_steps += 1
            self.shared_prefix_rows += tiled_rows
        self.mixed_steps += decode > 0
        run_step = self._shared_step if tiled_rows else self._step
        packed = _packed(rows, tokens, packed, decode)
        self.cache, self.seen, logits, seen_rows, hidden = run_step(
            (rows, tokens, packed, decode), self.params, self.cache, self.seen, self.last_tokens, token_ids, row_table,
            packed=packed, decode=decode)
        logits = self.guided.mask(logits, row_table)
        if extended_rows is None:
            mode = self._sampler_mode(rows, sample_mode(sampling_ints, sampling_floats))
            next_tokens, self.last_tokens = self._sample((rows, mode), logits, sampling_ints, sampling_floats,
                                                         seen_rows, self.last_tokens, row_table, mode)
            self.guided.advance(next_tokens, row_table)
            next_tokens.copy_to_host_async()  # the transfer starts as soon as the step ends
            output = StepOutput(next_tokens)
        else:
            output = self._run_extended(chunks, logits, sampling_ints, sampling_floats, seen_rows, row_table,
                                        extended_rows, token_ids[:, 0])
        if not any(wants_hidden(chunk) for chunk in chunks):
            return output
        hidden.copy_to_host_async()
        return dataclasses.replace(output, hidden=hidden)

    def warm(self, shape: StepShape) -> None:
        """Run one step of padding rows at `shape` (its step program and greedy sampler) and wait for it.

        A program's first run costs more than the next: on XLA:CPU 0.4-0.9 s more for a SmolLM2-135M step
        (docs/perf-notes.md), which a request would otherwise wait through. Padding rows write no page and
        sample into the scratch row past every slot's, so the state stays what it was."""
        rows, tokens, packed, decode = shape
        token_ids, row_table, ints, floats, _ = self._padding_inputs(rows, tokens)
        packed = _packed(*shape)
        self.cache, self.seen, logits, seen_rows, _ = self._step(
            (rows, tokens, packed, decode), self.params, self.cache, self.seen, self.last_tokens, token_ids, row_table,
            packed=packed, decode=decode)
        mode = self._sampler_mode(rows, sample_mode(ints, floats))
        next_tokens, self.last_tokens = self._sample((rows, mode), logits, ints, floats, seen_rows, self.last_tokens,
                                                     row_table, mode)
        next_tokens.block_until_ready()
        self.warm_steps += 1

    def _run_extended(self, chunks: list[Chunk], logits: jax.Array, sampling_ints: np.ndarray,
                      sampling_floats: np.ndarray, seen_rows: jax.Array, row_table: np.ndarray,
                      extended_rows: ExtendedRows, first_tokens: np.ndarray) -> StepOutput:
        """The sampler of a step with a row that needs `sampling.EXTENDED` (logits already masked by any
        structured-output constraint, so log probabilities are those of the constrained distribution)."""
        next_tokens, self.last_tokens, self.counts, logprobs = self._sample_extended(
            len(row_table), logits, sampling_ints, sampling_floats, seen_rows, self.last_tokens, self.counts, row_table,
            extended_rows, first_tokens)
        self.guided.advance(next_tokens, row_table)
        next_tokens.copy_to_host_async()
        if not any(wants_logprobs(chunk) for chunk in chunks):
            return StepOutput(next_tokens)  # penalties or bias only: the log probabilities stay on the device
        for array in jax.tree.leaves(logprobs):
            array.copy_to_host_async()
        return StepOutput(next_tokens, logprobs)

    def _inputs(
        self, chunks: list[Chunk], rows: int, tokens: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, ExtendedRows | None]:
        """The padded, packed inputs of one step: tokens, rows, the sampling ints and floats, how many
        rows the shared-prefix plan put in a tile (0: run the plain step), and the extended sampler's rows
        when a row needs it (None otherwise; always for a step without chunks, which compiles them)."""
        n = len(chunks)
        fields = np.zeros((rows, ROW_FIELDS.width), np.int32)
        fields[:, _SLOT] = self.num_slots  # padding rows point past every per-slot table
        steps = np.zeros(rows, np.int32)
        token_ids = np.zeros((rows, tokens), np.int32)
        for r, chunk in enumerate(chunks):
            self.slots.sync(chunk)
            known = chunk.token_ids  # [] for a token on the device
            if known:
                assert len(known) == chunk.length, "only a lone decode token can still be on the device"
                token_ids[r, : chunk.length] = known
            fields[r, _PER_CHUNK] = (chunk.slot, chunk.start, chunk.length, not known, chunk.samples, chunk.first)
            steps[r] = chunk.step
        table_rows = np.where(np.arange(rows) < n, fields[:, _SLOT], self.num_slots)  # padding -> the null row
        tables = self.slots.block_tables[table_rows]
        tiled_rows = 0
        if self.plans_shared_prefix(rows, tokens):
            num_tiles = max_tiles_for(rows)
            tile = ROW_FIELDS.index("tile")
            fields[:, tile] = num_tiles  # padding rows are in no tile
            kv_lens = fields[:n, ROW_FIELDS.index("start")] + fields[:n, ROW_FIELDS.index("length")]
            plan = plan_shared_prefix(tables[:n], kv_lens, page_size=self.page_size,
                                      tile_size=tile_size_for(self.config.q_per_kv, rows), max_tiles=num_tiles)
            fields[:n, tile : tile + 3] = np.stack(plan, axis=1)  # tile, tile_slot, tile_start
            tiled_rows = int(np.count_nonzero(plan[0] < num_tiles))
        fields[:, ROW_FIELDS.index("guide")] = self.guided.column(chunks, rows)
        row_table = np.concatenate([fields, tables], axis=1)
        sampling = self.slots.sampling
        extended = None
        if not chunks or sampling.extended[table_rows[:n]].any():
            targets = np.full(rows, -1, np.int32)
            targets[:n] = [chunk.target for chunk in chunks]
            extended = sampling.gather_extended(table_rows, targets)
        return (token_ids, row_table, *sampling.gather(table_rows, steps), tiled_rows, extended)
