"""The device side of the engine: model weights, the paged KV cache, and one jitted step per bucket.

A step takes a padded `[B, T]` batch of token chunks (see `scheduler.Chunk`), writes their keys and
values into the cache, and samples one token per row from the logits at each row's last token. The
same function serves decode (`T == 1`) and prefill; it is compiled ahead of time for every bucket shape
at start-up and called through the compiled executables, so serving can never trigger a compilation.
Only the cache and the per-slot "seen tokens" table are donated, and both are rebound after every
call: they are updated in place, never copied.
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
    slots: jax.Array  # i32[B] row of the seen-tokens table; padding rows point past its end
    reset: jax.Array  # bool[B] a sequence starting over: clear its seen-tokens row first


def step(
    model: CausalLM,
    params: dict,
    cache: list[LayerCache],
    seen: jax.Array,  # bool[num_slots, V] tokens each running sequence has had (repetition penalty)
    inputs: StepInputs,
) -> tuple[list[LayerCache], jax.Array, jax.Array, jax.Array]:
    """Run the model over the batch and record its tokens as seen.

    Returns the new cache, the new seen table, f32[B, V] logits at each row's last token and each
    row's bool[B, V] seen tokens (the sampler's repetition-penalty input).
    """
    logits, cache = model.apply({"params": params}, inputs.tokens, inputs.attn, cache, inputs.last_index)
    num_slots = seen.shape[0]
    seen = seen.at[jnp.where(inputs.reset, inputs.slots, num_slots)].set(False, mode="drop")
    token_slots = jnp.where(inputs.attn.valid, inputs.slots[:, None], num_slots)
    seen = seen.at[token_slots, inputs.tokens].set(True, mode="drop")
    return cache, seen, logits, seen[jnp.minimum(inputs.slots, num_slots - 1)]


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
        # Logits leave the step whole (gathered across a vocab-split LM head) for the sampler.
        cache_shardings = jax.tree.map(lambda x: x.sharding, self.cache)
        self._step = jax.jit(
            functools.partial(step, self.model), donate_argnums=(1, 2),
            out_shardings=(cache_shardings, self._replicated, self._replicated, self._replicated),
        )
        self._sample = jax.jit(sample, in_shardings=self._replicated, out_shardings=self._replicated)
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
                self.params, self.cache, self.seen, inputs
            ).compile()
            if rows not in self._compiled_samplers:
                logits = jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.float32,
                                              sharding=self._replicated)
                seen_rows = jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.bool_,
                                                 sharding=self._replicated)
                self._compiled_samplers[rows] = self._sample.lower(
                    logits, SamplingBatch.from_rows([], rows), seen_rows
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
            self.params, self.cache, self.seen, inputs
        )
        return self._compiled_samplers[rows](logits, sampling, seen_rows)

    def _inputs(self, chunks: list[Chunk], rows: int, tokens: int) -> StepInputs:
        token_ids = np.zeros((rows, tokens), np.int32)
        positions = np.zeros((rows, tokens), np.int32)
        valid = np.zeros((rows, tokens), bool)
        kv_lens = np.zeros(rows, np.int32)
        tables = np.full((rows, self.pages_per_seq), NULL_PAGE, np.int32)
        last = np.zeros(rows, np.int32)
        slots = np.full(rows, self.num_slots, np.int32)
        reset = np.zeros(rows, bool)
        for r, chunk in enumerate(chunks):
            seq, n = chunk.seq, chunk.length
            token_ids[r, :n] = seq.token_ids[chunk.start : chunk.start + n]
            positions[r, :n] = np.arange(chunk.start, chunk.start + n)
            valid[r, :n] = True
            kv_lens[r] = chunk.start + n
            tables[r, : len(seq.pages)] = seq.pages
            last[r] = n - 1
            slots[r] = seq.slot
            reset[r] = chunk.start == 0
        attn = AttentionBatch(positions=positions, valid=valid, kv_lens=kv_lens, block_tables=tables)
        return StepInputs(tokens=token_ids, attn=attn, last_index=last, slots=slots, reset=reset)
