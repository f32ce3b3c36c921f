"""Paged attention in plain XLA that reads only as much of the cache as the batch's contexts cover.

The reference (`paged_attention.paged_attention_reference`) gathers every page of the block table, i.e.
the whole session length, for every row and every step: with a session of 8192 tokens a decode step at
a context of 200 reads 40 times the keys and values it needs. Here the block table is walked in chunks
of `CHUNK_TOKENS` tokens, in a loop whose trip count the device computes from the batch's longest
context (`context_chunks`), with the running-max ("online") softmax carried across chunks, as
flash-attention does. One program serves every context length, so nothing is compiled per length; the
result equals the reference's up to float rounding (the normalisation happens after the value product
rather than before it).

This is what the "xla" backend runs on CPU (and on accelerators without our Pallas kernels). On a GPU an
XLA loop whose bound lives on the device makes the host wait for it each iteration; GPUs run the Pallas
kernels, which bound their reads by `kv_lens` the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlkernels.kv_quant import Pages, QuantizedPages, as_values, unpack_int4
from xlkernels.paged_attention import NEG_INF
from xlkernels.shared_prefix import SharedPrefix

# Tokens of context one loop iteration reads (rounded to whole pages): the width the block table is read
# in. On CPU an iteration costs what its tokens cost and hardly more, so one page of the usual 64 tokens
# wastes least (docs/perf-notes.md, "CPU: the XLA attention loop and the cpu preset").
CHUNK_TOKENS = 64


def chunk_pages(page_size: int, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Pages one iteration reads: `chunk_tokens`' worth, at least one page."""
    return max(1, chunk_tokens // page_size)


def context_chunks(kv_lens: jax.Array, chunk_tokens: int, max_chunks: int) -> jax.Array:
    """How many chunks of `chunk_tokens` the batch's longest context spans (i32 scalar), at most `max_chunks`:
    the loop's trip count, i.e. the block-table width read this step is this many chunks."""
    longest = jnp.max(kv_lens)
    return jnp.minimum((longest + chunk_tokens - 1) // chunk_tokens, max_chunks).astype(jnp.int32)


def paged_attention_xla(
    q: jax.Array,  # [B, T, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, T]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    shared: SharedPrefix | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> jax.Array:  # [B, T, Hq, D] in q.dtype
    """`paged_attention_reference`'s contract, reading pages only up to the batch's longest context.

    `shared` is ignored, as by the reference: a shared-prefix plan is a hint for the Pallas kernels.
    Quantized pages are converted chunk by chunk after the gather, their scales applied to the scores
    (keys) and to the probabilities (values) rather than to every element.
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    pages = chunk_pages(page_size, chunk_tokens)
    tokens = pages * page_size
    max_chunks = -(-block_tables.shape[1] // pages)
    # Whole chunks of the table; the padding points at page 0, whose positions lie past every context.
    tables = jnp.pad(block_tables, ((0, 0), (0, max_chunks * pages - block_tables.shape[1])))
    # KV-head-major throughout: the gathered pages come out [Hkv, B, tokens, D], and both products take them
    # as they are, with (KV head, row) as their batch dimensions; [B, Hkv, ...] cost a transpose of every
    # gathered key and value (on CPU, a 16-row decode step spent a third of its time copying them).
    qg = q.reshape(batch, num_q, num_kv_heads, group, head_dim).transpose(2, 0, 3, 1, 4)  # [Hkv, B, G, T, D]

    def gather(cache: Pages, chunk_tables: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """The chunk's values [Hkv, B, tokens, D] (converted to q's dtype) and scales f32[Hkv, B, tokens]
        (None for a plain pool)."""
        # One gather per KV head: XLA lays a gather's result out index dimensions first, so `cache[:, tables]`
        # lands page-major and then costs a transpose of every key and value (~9% of a 16-row CPU decode step).
        if not isinstance(cache, QuantizedPages):
            heads = [cache[h][chunk_tables].reshape(batch, tokens, head_dim) for h in range(num_kv_heads)]
            return as_values(jnp.stack(heads)).astype(qg.dtype), None
        values, scales = [], []
        for h in range(num_kv_heads):
            data = cache.data[h][chunk_tables]  # [B, pages, PS / halves, D]
            if cache.kind == "int4":  # low nibbles hold each page's first half of tokens, high ones the second
                data = jnp.stack(unpack_int4(data), axis=2)
            values.append(data.reshape(batch, tokens, head_dim))
            scales.append(cache.scale[h][:, chunk_tables].transpose(1, 2, 0, 3).reshape(batch, tokens))
        return jnp.stack(values).astype(qg.dtype), jnp.stack(scales).astype(jnp.float32)

    def attend_chunk(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        running_max, denominator, acc = carry  # [Hkv, B, G, T], [Hkv, B, G, T], [Hkv, B, G, T, D]
        chunk_tables = jax.lax.dynamic_slice_in_dim(tables, i * pages, pages, axis=1)
        (k, k_scale), (v, v_scale) = gather(k_pages, chunk_tables), gather(v_pages, chunk_tables)
        scores = jnp.einsum("kbgtd,kbsd->kbgts", qg, k, preferred_element_type=jnp.float32) * scale
        if k_scale is not None:
            scores = scores * k_scale[:, :, None, None, :]
        kv_pos = i * tokens + jnp.arange(tokens, dtype=jnp.int32)
        visible = (kv_pos[None, None, :] <= q_positions[:, :, None]) & (kv_pos[None, None, :] < kv_lens[:, None, None])
        scores = jnp.where(visible[None, :, None, :, :], scores, NEG_INF)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        probs = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)  # earlier chunks' sums were taken against a smaller max
        denominator = denominator * rescale + probs.sum(axis=-1)
        weights = probs if v_scale is None else probs * v_scale[:, :, None, None, :]
        values = jnp.einsum("kbgts,kbsd->kbgtd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_max, denominator, acc * rescale[..., None] + values

    stats_shape = (num_kv_heads, batch, group, num_q)
    init = (jnp.full(stats_shape, NEG_INF, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32))
    num_chunks = context_chunks(kv_lens, tokens, max_chunks)
    _, denominator, acc = jax.lax.fori_loop(0, num_chunks, attend_chunk, init)
    # A batch of padding only runs no chunk: its rows come out as zeros rather than 0 / 0.
    out = jnp.where(denominator[..., None] > 0, acc / jnp.maximum(denominator, 1e-30)[..., None], 0.0)
    return out.transpose(1, 3, 0, 2, 4).reshape(batch, num_q, num_heads, head_dim).astype(q.dtype)
