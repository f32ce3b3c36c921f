"""The device side of the engine: model weights, the paged KV cache, and one jitted step per bucket.

A step takes a padded `[B, T]` batch of token chunks (see `scheduler.Chunk`), writes their keys and
values into the cache, and samples one token per row from the logits at each row's last token. The
same function serves decode (`T == 1`) and prefill; it is compiled ahead of time for every bucket shape
at start-up and called through the compiled executables, so serving can never trigger a compilation.
Only the per-sequence device state is donated — the cache, the "seen tokens" table (repetition
penalty) and each sequence's last sampled token — and it is rebound after every call: updated in
place, never copied. Because a decoding row reads its input token from that state, the engine can
dispatch step k+1 before it has read step k's tokens back.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.llama import AttentionBatch, CausalLM, LayerCache, empty_cache
from serving.engine.config import BucketSet
from serving.engine.pages import NULL_PAGE
from serving.engine.sampling import RowParams, SamplingBatch, sample
from serving.engine.scheduler import Chunk

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array  # i32[B, T]
    attn: AttentionBatch
    last_index: jax.Array  # i32[B] index in T of each row's last real token (its logits are sampled)
    slots: jax.Array  # i32[B] row of the per-sequence tables; padding rows point past their end
    reset: jax.Array  # bool[B] a sequence starting over: clear its seen-tokens row first
    from_device: jax.Array  # bool[B] the row's first token is still on the device: last_tokens[slot]
    samples: jax.Array  # bool[B] the row reaches its sequence's end: its sampled token is real


def step(
    model: CausalLM,
    params: dict,
    cache: list[LayerCache],
    seen: jax.Array,  # bool[num_slots, V] tokens each running sequence has had (repetition penalty)
    last_tokens: jax.Array,  # i32[num_slots] each sequence's latest sampled token
    inputs: StepInputs,
) -> tuple[list[LayerCache], jax.Array, jax.Array, jax.Array]:
    """Run the model over the batch and record its tokens as seen.

    A decoding row's input is the token the previous step sampled, which the host may not have read
    yet: it comes from `last_tokens`, so the host can dispatch this step before reading the last.
    Returns the new cache, the new seen table, f32[B, V] logits at each row's last token and each
    row's bool[B, V] seen tokens (the sampler's repetition-penalty input).
    """
    num_slots = seen.shape[0]
    slots = jnp.minimum(inputs.slots, num_slots - 1)
    first = jnp.where(inputs.from_device, last_tokens[slots], inputs.tokens[:, 0])
    tokens = inputs.tokens.at[:, 0].set(first)
    logits, cache = model.apply({"params": params}, tokens, inputs.attn, cache, inputs.last_index)
    seen = seen.at[jnp.where(inputs.reset, inputs.slots, num_slots)].set(False, mode="drop")
    token_slots = jnp.where(inputs.attn.valid, inputs.slots[:, None], num_slots)
    seen = seen.at[token_slots, tokens].set(True, mode="drop")
    return cache, seen, logits, seen[slots]


def sample_and_record(
    logits: jax.Array,  # f32[B, V]
    sampling: SamplingBatch,
    seen_rows: jax.Array,  # bool[B, V]
    last_tokens: jax.Array,  # i32[num_slots]
    slots: jax.Array,  # i32[B]
    samples: jax.Array,  # bool[B]
) -> tuple[jax.Array, jax.Array]:  # i32[B] sampled tokens, updated last_tokens
    tokens = sample(logits, sampling, seen_rows)
    target = jnp.where(samples, slots, last_tokens.shape[0])  # others (prompt chunks, padding) drop
    return tokens, last_tokens.at[target].set(tokens, mode="drop")


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
    ):
        self.config = config
        self.params = params
        self.page_size = page_size
        self.pages_per_seq = pages_per_seq
        self.buckets = buckets
        self.num_slots = num_slots
        self.model = CausalLM(config, dtype=dtype, attention_backend=attention_backend)
        self.cache = empty_cache(config, num_pages, page_size, dtype, mesh)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.seen = jax.jit(lambda: jnp.zeros((num_slots, config.vocab_size), jnp.bool_),
                            out_shardings=self._replicated)()
        self.last_tokens = jax.jit(lambda: jnp.zeros((num_slots,), jnp.int32), out_shardings=self._replicated)()
        # Logits leave the step whole (gathered across a vocab-split LM head) for the sampler.
        cache_shardings = jax.tree.map(lambda x: x.sharding, self.cache)
        self._step = jax.jit(
            functools.partial(step, self.model), donate_argnums=(1, 2),
            out_shardings=(cache_shardings, self._replicated, self._replicated, self._replicated),
        )
        self._sample = jax.jit(sample_and_record, in_shardings=self._replicated, out_shardings=self._replicated,
                               donate_argnums=(3,))
        self._compiled_steps: dict[tuple[int, int], jax.stages.Compiled] = {}
        # The sampler is compiled per row count, not per [rows, tokens] shape: it is the costlier
        # program to compile, and prefill and decode buckets share their row counts.
        self._compiled_samplers: dict[int, jax.stages.Compiled] = {}

    # ----- start-up ---------------------------------------------------------------------------------
    def compile_all(self, progress: bool = True) -> float:
        """Compile the step for every bucket shape and the sampler for every row count; returns seconds."""
        shapes = self.buckets.shapes()
        start = time.perf_counter()
        for i, (rows, tokens) in enumerate(shapes, 1):
            inputs = self._inputs([], rows, tokens)
            self._compiled_steps[(rows, tokens)] = self._step.lower(
                self.params, self.cache, self.seen, self.last_tokens, inputs
            ).compile()
            if rows not in self._compiled_samplers:
                logits = jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.float32,
                                              sharding=self._replicated)
                seen_rows = jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.bool_,
                                                 sharding=self._replicated)
                self._compiled_samplers[rows] = self._sample.lower(
                    logits, SamplingBatch.from_rows([], rows), seen_rows, self.last_tokens, inputs.slots,
                    inputs.samples,
                ).compile()
            if progress:
                logger.info("compiled step %d/%d [%d x %d] (%.1fs)", i, len(shapes), rows, tokens,
                            time.perf_counter() - start)
        return time.perf_counter() - start

    # ----- one step ---------------------------------------------------------------------------------
    def run(self, chunks: list[Chunk], rows: int, tokens: int) -> jax.Array:
        """Dispatch one step for `chunks` padded to the `[rows, tokens]` bucket; returns i32[rows] on device.

        The result is not waited for: the caller reads it when it needs the tokens, so the next
        dispatch can go out first.
        """
        inputs = self._inputs(chunks, rows, tokens)
        sampling = SamplingBatch.from_rows(
            [RowParams.for_request(c.seq.request, c.seq.num_generated) for c in chunks], rows
        )
        self.cache, self.seen, logits, seen_rows = self._compiled_steps[(rows, tokens)](
            self.params, self.cache, self.seen, self.last_tokens, inputs
        )
        next_tokens, self.last_tokens = self._compiled_samplers[rows](
            logits, sampling, seen_rows, self.last_tokens, inputs.slots, inputs.samples
        )
        next_tokens.copy_to_host_async()  # the transfer starts as soon as the step ends
        return next_tokens

    def _inputs(self, chunks: list[Chunk], rows: int, tokens: int) -> StepInputs:
        token_ids = np.zeros((rows, tokens), np.int32)
        positions = np.zeros((rows, tokens), np.int32)
        valid = np.zeros((rows, tokens), bool)
        kv_lens = np.zeros(rows, np.int32)
        tables = np.full((rows, self.pages_per_seq), NULL_PAGE, np.int32)
        last = np.zeros(rows, np.int32)
        slots = np.full(rows, self.num_slots, np.int32)
        reset = np.zeros(rows, bool)
        from_device = np.zeros(rows, bool)
        samples = np.zeros(rows, bool)
        for r, chunk in enumerate(chunks):
            seq, n = chunk.seq, chunk.length
            known = seq.token_ids[chunk.start : chunk.start + n]  # empty for a token still on the device
            assert len(known) in (0, n), "only a lone decode token can still be on the device"
            token_ids[r, : len(known)] = known
            from_device[r] = not known
            samples[r] = chunk.samples
            positions[r, :n] = np.arange(chunk.start, chunk.start + n)
            valid[r, :n] = True
            kv_lens[r] = chunk.start + n
            tables[r, : len(seq.pages)] = seq.pages
            last[r] = n - 1
            slots[r] = seq.slot
            reset[r] = chunk.start == 0
        attn = AttentionBatch(positions=positions, valid=valid, kv_lens=kv_lens, block_tables=tables)
        return StepInputs(tokens=token_ids, attn=attn, last_index=last, slots=slots, reset=reset,
                          from_device=from_device, samples=samples)
