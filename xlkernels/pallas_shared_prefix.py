"""Shared-prefix ("cascade") decode attention as Pallas GPU kernels (Triton lowering).

Same contract as `paged_attention_reference` with T == 1, given a `SharedPrefix` plan
(`xlkernels.shared_prefix`): tiles of up to R rows that hold the same first `tile_len` tokens' pages.

Two passes, one merge:
    prefix pass  grid = (tiles, num_kv_heads, prefix_splits). One program takes one tile, one KV head
                 and one slice of the tile's shared pages; its query block is every row of the tile
                 times the G heads of that KV head (R * G rows, 64 for Llama-3-8B with R = 16), so a
                 shared page crosses the SM once for all of them, and the two dots per block are
                 tensor-core sized (the per-row kernel fills 4 of 16 rows). No mask: every row sees
                 every shared key (the plan leaves each row's current token to its own pass).
    own pass     the decode kernel (`paged_decode_partials`) from each row's `row_start`: the keys
                 after the shared prefix (all keys for a row in no tile).
    merge        each row's prefix partials are gathered from its tile and merged with its own
                 splits by the decode path's log-sum-exp merge (`merge_splits_pallas`).

Unused tiles (tile_len 0) and empty slices exit at once and store no output; their l is 0, which gives
them weight 0 in the merge.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlkernels.kv_quant import Pages
from xlkernels.pallas_decode import (
    LOG2_E,
    MIN_DOT_ROWS,
    NEG_INF,
    attend_pages,
    default_pages_per_block,
    is_pow2,
    merge_splits_pallas,
    next_pow2,
    paged_decode_partials,
    split_pages,
)
from xlkernels.pallas_kv import pool_inputs, pool_specs
from xlkernels.shared_prefix import SharedPrefix

# Slices of each tile's prefix. B4's step on the H100 (16 tiles x 8 KV heads, 2048 shared tokens):
# 233 us with 2 slices, 246 with 4, 258 with 8 (docs/perf-notes.md, "Shared-prefix attention").
DEFAULT_PREFIX_SPLITS = 2


def _prefix_kernel(
    q_ref,  # [M, D] the tile's rows x the G query heads of one KV head (M padded to a power of two)
    *refs,  # this KV head's whole page pools (`pallas_kv.pool_inputs`, `num_pool` refs), then:
    # table_ref i32[pps_padded] the block table of the tile's first row (all rows agree on the prefix);
    # len_ref i32[1] shared tokens of the tile (whole pages; 0 for an unused tile); o_ref f32[M, D] this
    # slice's output, normalised by its own l; l_ref f32[M]; m_ref f32[M] running max, log2 domain
    num_pool: int,
    kind: str | None,
    page_size: int,
    pages_per_block: int,
    prefix_splits: int,
    scale_log2: float,
):
    pool_refs = refs[:num_pool]
    table_ref, len_ref, o_ref, l_ref, m_ref = refs[num_pool:]
    num_pages = len_ref[0] // page_size
    first_page, end_page, num_blocks = split_pages(0, num_pages, prefix_splits, pages_per_block)
    acc, m, l = attend_pages(q_ref[...], pool_refs, table_ref, first_page, end_page, num_blocks,
                             end_page * page_size, kind=kind, page_size=page_size,
                             pages_per_block=pages_per_block, scale_log2=scale_log2)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]

    @pl.when(num_blocks > 0)  # an empty slice skips its output store: the merge gives it weight 0 (l == 0)
    def _store():
        o_ref[...] = out

    l_ref[...] = l
    m_ref[...] = m


def shared_prefix_partials(
    q: jax.Array,  # [B, 1, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    shared: SharedPrefix,
    *,
    scale: float,
    pages_per_block: int | None = None,
    prefix_splits: int = DEFAULT_PREFIX_SPLITS,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # f32 o[B, Hkv, S, G, D], l and m [B, Hkv, S, G]
    """The prefix pass, handed back per row: each row's partials over its tile's shared keys (l == 0
    for a row in no tile), ready to be merged with its own pass's splits."""
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    pool = pool_inputs(k_pages, v_pages)
    num_tiles, tile_size = shared.tile_rows.shape
    group = num_heads // num_kv_heads
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size)
    if not all(is_pow2(n) for n in (pages_per_block, page_size, head_dim)):
        raise ValueError(f"{pages_per_block=}, {page_size=} and {head_dim=} must be powers of two")
    pages_per_seq = block_tables.shape[1]
    padded_pps = pl.cdiv(pages_per_seq, pages_per_block) * pages_per_block

    # Query blocks [tiles, Hkv, M, D]: row r of a tile and head g of the KV head at r * G + g; pad rows
    # (and the rows of unused tile slots, which gather row B-1) cost dot work only and are never read.
    members = jnp.minimum(shared.tile_rows, batch - 1)  # [tiles, R]
    q_tiles = q[:, 0].reshape(batch, num_kv_heads, group, head_dim)[members]  # [tiles, R, Hkv, G, D]
    q_tiles = q_tiles.transpose(0, 2, 1, 3, 4).reshape(num_tiles, num_kv_heads, tile_size * group, head_dim)
    rows = max(MIN_DOT_ROWS, next_pow2(tile_size * group))
    q_tiles = jnp.pad(q_tiles, ((0, 0), (0, 0), (0, rows - tile_size * group), (0, 0)))
    tables = block_tables[members[:, 0]].astype(jnp.int32)  # [tiles, pps]
    if padded_pps != pages_per_seq:
        tables = jnp.pad(tables, ((0, 0), (0, padded_pps - pages_per_seq)))

    kernel = functools.partial(_prefix_kernel, num_pool=len(pool.arrays), kind=pool.kind, page_size=page_size,
                               pages_per_block=pages_per_block, prefix_splits=prefix_splits,
                               scale_log2=scale * LOG2_E)
    stat_shape = jax.ShapeDtypeStruct((num_tiles, num_kv_heads, prefix_splits, rows), jnp.float32)
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda t, h, s: (t, h, s, 0))
    o, l, m = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((num_tiles, num_kv_heads, prefix_splits, rows, head_dim), jnp.float32),
                   stat_shape, stat_shape],
        grid=(num_tiles, num_kv_heads, prefix_splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda t, h, s: (t, h, 0, 0)),
            *pool_specs(pool, lambda t, h, s: h),
            pl.BlockSpec((None, padded_pps), lambda t, h, s: (t, 0)),
            pl.BlockSpec((1,), lambda t, h, s: (t,)),
        ],
        out_specs=[pl.BlockSpec((None, None, None, rows, head_dim), lambda t, h, s: (t, h, s, 0, 0)),
                   stat_spec, stat_spec],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"xlserve_shared_prefix_ppb{pages_per_block}_ps{prefix_splits}",
    )(q_tiles, *pool.arrays, tables, shared.tile_len.astype(jnp.int32))

    # Back to rows: row b takes query rows [slot * G, slot * G + G) of its tile.
    def per_row(x: jax.Array) -> jax.Array:  # [tiles, Hkv, S, M, ...] -> [B, Hkv, S, G, ...]
        x = x[:, :, :, : tile_size * group].reshape(*x.shape[:3], tile_size, group, *x.shape[4:])
        return x[jnp.minimum(shared.row_tile, num_tiles - 1), :, :, shared.row_slot]

    # A row in no tile reads some tile's numbers: zero weight, and a max that cannot outweigh its own splits.
    in_tile = (shared.row_tile < num_tiles)[:, None, None, None]
    return per_row(o), jnp.where(in_tile, per_row(l), 0.0), jnp.where(in_tile, per_row(m), NEG_INF)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "pages_per_block", "k_splits", "prefix_splits", "num_warps", "num_stages",
                     "interpret"),
)
def shared_prefix_decode_attention(
    q: jax.Array,  # [B, 1, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, 1]
    kv_lens: jax.Array,  # i32[B]
    shared: SharedPrefix,
    *,
    scale: float,
    pages_per_block: int | None = None,
    k_splits: int | None = None,
    prefix_splits: int = DEFAULT_PREFIX_SPLITS,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, 1, Hq, D] in q.dtype
    """Decode attention with the shared prefixes read once per tile (see the module docstring). `num_warps` and
    `num_stages` (None: 4 and 3 for the prefix pass; the decode kernel's rules for the rows' own pass,
    `pallas_decode.default_num_warps` and `default_num_stages`)."""
    batch, _, num_heads, head_dim = q.shape
    prefix = shared_prefix_partials(q, k_pages, v_pages, block_tables, shared, scale=scale,
                                    pages_per_block=pages_per_block, prefix_splits=prefix_splits,
                                    num_warps=num_warps or 4, num_stages=num_stages or 3, interpret=interpret)
    own = paged_decode_partials(q, k_pages, v_pages, block_tables, q_positions, kv_lens, shared.row_start,
                                scale=scale, pages_per_block=pages_per_block, k_splits=k_splits,
                                final_if_one_split=False, num_warps=num_warps, num_stages=num_stages,
                                interpret=interpret)
    out = merge_splits_pallas([prefix, tuple(own)], q.dtype, interpret=interpret)
    return out.reshape(batch, 1, num_heads, head_dim)
