"""Attention over a paged KV cache: the XLA reference that every GPU kernel is checked against.

Layout (per layer), the one JAX's GPU paged kernel expects, so each KV head's pages are one slab:
    k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim]
    block_tables:     i32[batch, pages_per_seq]   page ids of each row, in sequence order
A query at position p of row b sees the cached keys at positions 0..p of that row (causal), and never
past kv_lens[b]. Decode is the T=1 case; chunked prefill and prefix hits are T>1 with a non-zero start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlkernels.kv_quant import Pages, as_float, write_tokens
from xlkernels.shared_prefix import SharedPrefix

NEG_INF = -1e30


def paged_attention_reference(
    q: jax.Array,  # [B, T, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, T]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    shared: SharedPrefix | None = None,
) -> jax.Array:  # [B, T, Hq, D] in q.dtype
    """Gather each row's pages into a contiguous context, then masked softmax attention in f32.
    Quantized pools are dequantized whole first: the oracle, not a fast path.

    `shared` is ignored: a shared-prefix plan changes how attention is computed, never what.
    """
    k_pages, v_pages = as_float(k_pages), as_float(v_pages)
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    context = block_tables.shape[1] * page_size

    def gather(pages: jax.Array) -> jax.Array:  # -> [B, Hkv, S, D]
        rows = pages[:, block_tables]  # [Hkv, B, pages_per_seq, PS, D]
        return rows.reshape(num_kv_heads, batch, context, head_dim).transpose(1, 0, 2, 3)

    k, v = gather(k_pages), gather(v_pages)
    qg = q.reshape(batch, num_q, num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    kv_pos = jnp.arange(context, dtype=jnp.int32)
    visible = (kv_pos[None, None, :] <= q_positions[:, :, None]) & (kv_pos[None, None, :] < kv_lens[:, None, None])
    scores = jnp.where(visible[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, num_q, num_heads, head_dim).astype(q.dtype)


def token_slots(block_tables: jax.Array, positions: jax.Array, valid: jax.Array, num_pages: int,
                page_size: int) -> tuple[jax.Array, jax.Array]:  # (i32[B * T] page, i32[B * T] slot in it)
    """Where each token of a [B, T] step is stored: its page and its slot. A padding token's page is `num_pages`,
    out of range, so a write with mode="drop" (or a kernel's bounds check) skips it."""
    page = jnp.take_along_axis(block_tables, positions // page_size, axis=1, mode="clip")
    return jnp.where(valid, page, num_pages).reshape(-1), (positions % page_size).reshape(-1)


def write_kv_pages(
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant: quantized as it is written)
    v_pages: Pages,  # [Hkv, P, PS, D]
    k: jax.Array,  # [B, T, Hkv, D]
    v: jax.Array,  # [B, T, Hkv, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    positions: jax.Array,  # i32[B, T]
    valid: jax.Array,  # bool[B, T]; padding tokens are dropped, never written
) -> tuple[Pages, Pages]:
    """Scatter new keys/values into their pages; padded tokens go to an out-of-range page and drop."""
    flat_pages, flat_offsets = token_slots(block_tables, positions, valid, *k_pages.shape[1:3])

    def scatter(pages: Pages, new: jax.Array) -> Pages:
        new = new.reshape(-1, new.shape[2], new.shape[3]).transpose(1, 0, 2)  # [Hkv, B*T, D]
        return write_tokens(pages, new, flat_pages, flat_offsets)

    return scatter(k_pages, k), scatter(v_pages, v)
