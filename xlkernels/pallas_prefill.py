"""Paged prefill attention (T > 1 query tokens per row) as a Pallas kernel for GPUs (Triton lowering).

Same contract as `xlkernels.paged_attention.paged_attention_reference`; used for chunked prefill and
prefix-cache hits, where a row's new tokens attend to its cached pages and to themselves (they are
written to the pages before attention runs).

Work split (flash attention over pages):
    grid = (batch, num_kv_heads, T / block_q). One program takes `block_q` query tokens of one row and
    the G query heads that share one KV head, i.e. `block_q * G` rows of the score matrix, so every
    K/V block loaded serves all G heads. It walks the row's pages in blocks of `pages_per_block` pages
    up to the block's causal limit (the largest query position + 1, capped by kv_len) with an online
    softmax. Blocks that every query row sees in full take a loop without masks; only the last few
    blocks near the diagonal (and the kv_len edge) pay for masking. Query blocks are launched
    heaviest (latest) first, so the causal triangle's long programs don't finish alone at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlkernels.kv_quant import Pages
from xlkernels.pallas_decode import H100_NUM_SMS, LOG2_E, MIN_DOT_ROWS, NEG_INF, is_pow2, next_pow2
from xlkernels.pallas_kv import block_scores, block_values, load_block, pool_inputs, pool_specs


def _prefill_kernel(
    q_ref,  # [block_q, G, D] block_q query tokens x the G heads of one KV head
    *refs,  # this KV head's whole page pools (`pallas_kv.pool_inputs`, `num_pool` refs), then:
    # table_ref i32[pps_padded] this row's block table; pos_ref i32[block_q] the query tokens' positions
    # (-1 for padding tokens: they see nothing); len_ref i32[1] kv_lens of the row; o_ref [block_q, G, D]
    num_pool: int,
    kind: str | None,
    page_size: int,
    pages_per_seq: int,
    pages_per_block: int,
    scale_log2: float,
):
    pool_refs = refs[:num_pool]
    table_ref, pos_ref, len_ref, o_ref = refs[num_pool:]
    block_q, group, head_dim = q_ref.shape
    block_k = pages_per_block * page_size
    rows = block_q * group

    q = q_ref[...].reshape(rows, head_dim)  # row r = token r // G, head r % G
    pos = pos_ref[...]
    row_pos = jnp.broadcast_to(pos[:, None], (block_q, group)).reshape(rows)
    kv_len = len_ref[0]
    # Keys some row of this block sees, and keys every row sees; both capped by the cache length.
    hi = jnp.maximum(jnp.minimum(kv_len, pos.max() + 1), 0)
    lo = jnp.maximum(jnp.minimum(kv_len, pos.min() + 1), 0)
    num_pages = jnp.minimum(pl.cdiv(hi, page_size), pages_per_seq)
    num_blocks = pl.cdiv(num_pages, pages_per_block)
    num_full_blocks = jnp.minimum(lo // block_k, num_blocks)

    def blocks_of(i):  # -> whole-token sub-blocks of compute block i (`pallas_kv.load_block`)
        page0 = i * pages_per_block
        slot = page0 + jnp.arange(pages_per_block, dtype=jnp.int32)
        # Slots past the live pages read page 0 (always valid; masked below), never a stale entry.
        pages = plgpu.load(table_ref.at[pl.ds(page0, pages_per_block)], mask=slot < num_pages, other=0)
        return load_block(pool_refs, kind, pages, page0, pages_per_block=pages_per_block, page_size=page_size)

    def step(carry, scores, blocks, visible):  # scores f32[rows, n] and visible bool[rows, n] per sub-block
        acc, m_prev, l_prev = carry  # f32[rows, D], f32[rows], f32[rows]
        m_next = functools.reduce(jnp.maximum, [s.max(axis=1) for s in scores], m_prev)
        correction = jnp.exp2(m_prev - m_next)
        probs = [jnp.exp2(s - m_next[:, None]) for s in scores]
        if visible is not None:  # a row with nothing visible yet has m == NEG_INF: p would be 1
            probs = [jnp.where(seen, p, 0.0) for seen, p in zip(visible, probs, strict=True)]
        l_next = l_prev * correction + sum(p.sum(axis=1) for p in probs)
        acc = acc * correction[:, None] + sum(block_values(p, b, q.dtype) for p, b in zip(probs, blocks, strict=True))
        return acc, m_next, l_next

    def full_body(i, carry):
        blocks = blocks_of(i)
        return step(carry, [block_scores(q, b, scale_log2) for b in blocks], blocks, None)

    def masked_body(i, carry):
        blocks = blocks_of(i)
        visible = [(b.key_pos[None, :] <= row_pos[:, None]) & (b.key_pos[None, :] < kv_len) for b in blocks]
        scores = [jnp.where(seen, block_scores(q, b, scale_log2), NEG_INF)
                  for seen, b in zip(visible, blocks, strict=True)]
        return step(carry, scores, blocks, visible)

    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), NEG_INF, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, num_full_blocks, full_body, carry)
    acc, _, l = jax.lax.fori_loop(num_full_blocks, num_blocks, masked_body, carry)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # padding tokens (l == 0) get zeros, not NaN
    o_ref[...] = out.reshape(block_q, group, head_dim).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_rows", "pages_per_block", "num_warps", "num_stages", "interpret"),
)
def paged_prefill_attention(
    q: jax.Array,  # [B, T, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, T]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    block_rows: int = 128,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:  # [B, T, Hq, D] in q.dtype
    """Paged causal attention for T query tokens per row.

    block_rows: score-matrix rows per program (query tokens x G heads); pages_per_block: pages per
    K/V step (default: 64 tokens). Both powers of two. num_warps: default 4, or 8 when there are
    fewer than two programs per SM (measured on the H100, docs/perf-notes.md: with a full grid, 4
    warps run 11% faster; with under one wave of programs, 8 warps per program run 25% faster).
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    pool = pool_inputs(k_pages, v_pages)
    pages_per_seq = block_tables.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
    group = num_heads // num_kv_heads
    if pages_per_block is None:
        pages_per_block = max(1, 64 // page_size)
    if not all(is_pow2(n) for n in (block_rows, pages_per_block, page_size, head_dim)):
        raise ValueError(f"{block_rows=}, {pages_per_block=}, {page_size=}, {head_dim=} must be powers of 2")

    q = q.reshape(batch, num_q, num_kv_heads, group, head_dim)  # head h*G + g -> [h, g]
    # Loads need power-of-two sizes: a group like 7 (28 q / 4 kv heads) is padded to 8 with zero heads.
    group_p = next_pow2(group)
    # Query tokens per program: block_rows rows in all, at least 16 rows for tl.dot, and no more
    # tokens than the (power-of-two rounded) chunk so short chunks don't compute mostly padding.
    block_q = max(block_rows // group_p, pl.cdiv(MIN_DOT_ROWS, group_p))
    block_q = min(block_q, max(next_pow2(num_q), pl.cdiv(MIN_DOT_ROWS, group_p)))
    padded_q = pl.cdiv(num_q, block_q) * block_q
    if group_p != group or padded_q != num_q:
        q = jnp.pad(q, ((0, 0), (0, padded_q - num_q), (0, 0), (0, group_p - group), (0, 0)))
        q_positions = jnp.pad(q_positions, ((0, 0), (0, padded_q - num_q)), constant_values=-1)
    padded_pps = pl.cdiv(pages_per_seq, pages_per_block) * pages_per_block
    if padded_pps != pages_per_seq:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, padded_pps - pages_per_seq)))

    num_q_blocks = padded_q // block_q
    if num_warps is None:
        num_warps = 8 if batch * num_kv_heads * num_q_blocks < 2 * H100_NUM_SMS else 4

    kernel = functools.partial(
        _prefill_kernel,
        num_pool=len(pool.arrays),
        kind=pool.kind,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        pages_per_block=pages_per_block,
        scale_log2=scale * LOG2_E,
    )
    # Query blocks run heaviest first: the grid's last axis is launched last, and a block's work grows
    # with its position (causal), so block i of the grid takes query block num_blocks-1-i. The long
    # programs start early and the short ones fill the tail.
    q_spec = pl.BlockSpec((None, block_q, None, group_p, head_dim),
                          lambda b, h, i: (b, num_q_blocks - 1 - i, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch, num_kv_heads, num_q_blocks),
        in_specs=[
            q_spec,
            *pool_specs(pool, lambda b, h, i: h),
            pl.BlockSpec((None, padded_pps), lambda b, h, i: (b, 0)),
            pl.BlockSpec((None, block_q), lambda b, h, i: (b, num_q_blocks - 1 - i)),
            pl.BlockSpec((1,), lambda b, h, i: (b,)),
        ],
        out_specs=q_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"xlserve_paged_prefill_bq{block_q}_ppb{pages_per_block}",
    )(q, *pool.arrays, block_tables.astype(jnp.int32), q_positions.astype(jnp.int32),
      kv_lens.astype(jnp.int32))
    return out[:, :num_q, :, :group].reshape(batch, num_q, num_heads, head_dim)
