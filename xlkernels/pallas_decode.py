"""Paged decode attention (one query token per row) as a Pallas kernel for GPUs (Triton lowering).

Same contract as `xlkernels.paged_attention.paged_attention_reference` with T == 1.

Work split (flash-decoding):
    grid = (batch, num_kv_heads, k_splits). One program takes one row, one KV head and the G query
    heads that share it (GQA: the K/V pages are read once for all G heads), and one contiguous slice of
    that row's pages. The slice length is computed at run time from the row's own length, so every
    row's live pages are spread over all `k_splits` programs whatever its length, and pages past the
    length are never read (the page loop's trip count comes from the length).
    Each program keeps an online softmax over blocks of `pages_per_block` pages and writes its partial
    output normalised by its own denominator, plus that denominator l and its running max m (log2
    domain). A log-sum-exp merge over the splits in plain JAX gives the result. With one split the
    kernel writes the final output directly and no merge runs. `paged_decode_partials` can also start
    each row at a page-aligned `kv_starts` and hand back the unmerged splits: the shared-prefix path
    (`xlkernels.pallas_shared_prefix`) attends to the pages before that start in one pass per tile of rows.

Why the padding of query rows: Triton's `dot` needs at least 16 rows, and G is 1..8 for most models,
so each program gathers its G query rows into `rows = max(16, next_pow2(G))` rows (the spare rows
repeat the last head; they cost tensor-core work, not memory traffic) and stores only the first G.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlkernels.kv_quant import Pages, QuantizedPages
from xlkernels.pallas_kv import (
    block_scores,
    block_values,
    load_block,
    pool_inputs,
    pool_specs,
)

# A finite "minus infinity": exp2 of (NEG_INF - NEG_INF) is 1, not NaN, so empty rows stay finite.
NEG_INF = -1e30
LOG2_E = math.log2(math.e)
H100_NUM_SMS = 132
MIN_DOT_ROWS = 16  # Triton's tl.dot needs M >= 16
MAX_SPLIT_TOKENS = 1024  # longest split of a full-length row; see default_k_splits
MAX_LENGTH_SPLITS = 8  # at most this many splits come from the table length; see default_k_splits


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_pages_per_block(page_size: int) -> int:
    """Pages per compute block: 64 tokens per step. On the H100 (docs/perf-notes.md) 64-token blocks
    with 3 pipeline stages beat 128-token blocks with 2: 96 KB of shared memory instead of 128 KB
    lets two programs share an SM, and the extra stage keeps as many bytes in flight."""
    return max(1, 64 // page_size)


def default_num_warps(quantized: bool, pages_per_block: int) -> int:
    """Warps per program: 4, or 1 over quantized pages in one-page blocks. A quantized block converts its
    keys and values in registers, and one warp per program (more programs resident per SM) ran the fp8
    and int8 kernels 1.1-1.3x faster on the H100 at every measured batch and context, while bf16 pages
    took the same time with 1 to 4 warps (docs/perf-notes.md, eleventh session)."""
    return 1 if quantized and pages_per_block == 1 else 4


# Programs (rows x KV heads x splits) from which a kernel over unquantized pages runs one pipeline stage.
STAGES_ONE_MIN_PROGRAMS = 1024


def default_num_stages(quantized: bool, programs: int) -> int:
    """Triton's software-pipelining depth: 3, or 1 over bf16 pages when the grid has STAGES_ONE_MIN_PROGRAMS
    programs or more. One stage holds one block's keys and values in shared memory instead of three, so more
    programs stay resident on an SM, which pays once there are enough of them to fill it; with fewer, each
    program has more blocks to pipeline and three stages win, as they do for the one-warp kernels over
    quantized pages (docs/perf-notes.md, "Twentieth session", has the H100's figures)."""
    return 1 if not quantized and programs >= STAGES_ONE_MIN_PROGRAMS else 3


def default_k_splits(
    batch: int,
    num_kv_heads: int,
    num_blocks: int,
    block_tokens: int,
    *,
    num_sms: int = H100_NUM_SMS,
    max_split_tokens: int = MAX_SPLIT_TOKENS,
) -> int:
    """Splits per row: the larger of
      - enough for batch * heads * splits >= two programs per SM (small batches fill the GPU), and
      - enough that a full-length row's split is at most `max_split_tokens` long, but no more than
        MAX_LENGTH_SPLITS: in a ragged batch the longest rows would otherwise own the longest programs
        and finish alone (the tail). The table length stands in for the longest row, which is only
        known at run time; rows much shorter than their table pay for the extra (then tiny or empty)
        splits, hence the cap (docs/perf-notes.md has the numbers both ways).
    A power of two, and never more than the compute blocks of a full-length row (num_blocks blocks of
    block_tokens tokens): an extra split could only ever be empty."""
    fill = next_pow2(pl.cdiv(2 * num_sms, batch * num_kv_heads))
    bounded = min(next_pow2(pl.cdiv(num_blocks * block_tokens, max_split_tokens)), MAX_LENGTH_SPLITS)
    return max(1, min(max(fill, bounded), 1 << (max(num_blocks, 1).bit_length() - 1)))


def split_pages(start_page: jax.Array, num_pages: jax.Array, splits: int,
                pages_per_block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """This program's share (split `pl.program_id(2)` of `splits`) of the pages [start_page, num_pages):
    (first page, end page, compute blocks). Shares are rounded up to whole blocks so a block never
    straddles two splits; trailing splits may be empty."""
    share = pl.cdiv(pl.cdiv(num_pages - start_page, splits), pages_per_block) * pages_per_block
    first_page = start_page + pl.program_id(2) * share
    end_page = jnp.minimum(first_page + share, num_pages)
    return first_page, end_page, pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_block)


def attend_pages(
    q: jax.Array,  # [rows, D]
    pool_refs,  # one KV head's page pools: k, v [P, PS, D] (plus their scales when quantized, `pallas_kv`)
    table_ref,  # i32[pps_padded] the block table the pages come from
    first_page: jax.Array,
    end_page: jax.Array,
    num_blocks: jax.Array,
    key_limit: jax.Array,  # keys at or past this position are masked
    *,
    kind: str | None,  # the pools' quantized format (None: plain)
    page_size: int,
    pages_per_block: int,
    scale_log2: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # f32 acc[rows, D] (unnormalised), m and l [rows]
    """Online softmax of `q` over the table's pages [first_page, end_page), `pages_per_block` at a time."""
    rows, head_dim = q.shape

    def body(i, carry):
        acc, m_prev, l_prev = carry  # f32[rows, D], f32[rows], f32[rows]
        page0 = first_page + i * pages_per_block
        slot = page0 + jnp.arange(pages_per_block, dtype=jnp.int32)
        # Slots past the live pages load page 0 (always a valid page; its keys are masked below), so a
        # stale or out-of-range table entry is never dereferenced.
        pages = plgpu.load(table_ref.at[pl.ds(page0, pages_per_block)], mask=slot < end_page, other=0)
        blocks = load_block(pool_refs, kind, pages, page0, pages_per_block=pages_per_block, page_size=page_size)
        # f32[rows, n] per sub-block, log2 domain
        scores = [jnp.where((b.key_pos < key_limit)[None, :], block_scores(q, b, scale_log2), NEG_INF)
                  for b in blocks]
        # Every block holds at least one visible key (its first, as it starts below end_page), so m_next is
        # a real score and masked keys get exp2(NEG_INF - m_next) == 0.
        m_next = functools.reduce(jnp.maximum, [s.max(axis=1) for s in scores], m_prev)
        correction = jnp.exp2(m_prev - m_next)
        probs = [jnp.exp2(s - m_next[:, None]) for s in scores]
        l_next = l_prev * correction + sum(p.sum(axis=1) for p in probs)
        acc = acc * correction[:, None] + sum(block_values(p, b, q.dtype)
                                              for p, b in zip(probs, blocks, strict=True))
        return acc, m_next, l_next

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), NEG_INF, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    return jax.lax.fori_loop(0, num_blocks, body, init)


def _decode_kernel(
    q_ref,  # [G, D] the query heads of one KV head of one row
    *refs,  # this KV head's whole page pools (`pallas_kv.pool_inputs`, `num_pool` refs), then:
    # table_ref i32[pps_padded] this row's block table; pos_ref i32[1] the query's position; len_ref i32[1]
    # kv_lens of the row; start_ref i32[1] first key of the row to attend to (a multiple of the page size);
    # o_ref [G, D] this split's output (normalised by its own l); then (l f32[G], m f32[G]) when the splits
    # are merged afterwards
    num_pool: int,
    kind: str | None,
    page_size: int,
    group: int,
    rows: int,
    pages_per_seq: int,
    pages_per_block: int,
    k_splits: int,
    scale_log2: float,
):
    pool_refs = refs[:num_pool]
    table_ref, pos_ref, len_ref, start_ref, o_ref, *stats_refs = refs[num_pool:]
    head_dim = q_ref.shape[-1]

    # Keys this query may see: causal (0..pos) and inside the cache (< kv_len).
    visible = jnp.minimum(len_ref[0], pos_ref[0] + 1)
    num_pages = jnp.minimum(pl.cdiv(jnp.maximum(visible, 0), page_size), pages_per_seq)
    start_page = jnp.minimum(start_ref[0] // page_size, num_pages)  # pages before it: a shared prefix's
    first_page, end_page, num_blocks = split_pages(start_page, num_pages, k_splits, pages_per_block)

    row_ids = jnp.minimum(jnp.arange(rows, dtype=jnp.int32), group - 1)  # spare rows repeat head G-1
    q = q_ref[row_ids]  # [rows, D]
    acc, m, l = attend_pages(q, pool_refs, table_ref, first_page, end_page, num_blocks, visible, kind=kind,
                             page_size=page_size, pages_per_block=pages_per_block, scale_log2=scale_log2)
    # A padding row (kv_len 0) has l == 0: write zeros, never 0/0.
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    # Store only the G real heads: row indices past G point outside the block, but their lanes are
    # masked off, so nothing is written there (in interpret mode the scatter drops them). An empty
    # split skips its output when there is a merge (which gives it weight 0 through l == 0).
    store_rows = jnp.arange(rows, dtype=jnp.int32)
    real = store_rows < group
    live = (num_blocks > 0) if stats_refs else True
    cols = jnp.arange(head_dim, dtype=jnp.int32)
    o_view = o_ref.at[store_rows[:, None], cols[None, :]]  # both axes integer-indexed: a scatter
    plgpu.store(o_view, out.astype(o_ref.dtype), mask=real[:, None] & live)
    for ref, val in zip(stats_refs, (l, m), strict=False):
        plgpu.store(ref.at[store_rows], val, mask=real)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "pages_per_block", "k_splits", "num_warps", "num_stages", "interpret"),
)
def paged_decode_attention(
    q: jax.Array,  # [B, 1, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, 1]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    pages_per_block: int | None = None,
    k_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, 1, Hq, D] in q.dtype
    """Paged decode attention (see the module docstring for the work split).

    Tunables (defaults measured on the H100, docs/perf-notes.md): pages_per_block, pages per K/V step
    (None: 64 tokens); k_splits, programs per row and KV head (None: `default_k_splits`); num_warps
    (None: `default_num_warps`) and num_stages (None: `default_num_stages`), Triton's warps per program and
    software-pipelining depth.
    """
    batch, _, num_heads, head_dim = q.shape
    outs = paged_decode_partials(q, k_pages, v_pages, block_tables, q_positions, kv_lens, None, scale=scale,
                                 pages_per_block=pages_per_block, k_splits=k_splits, final_if_one_split=True,
                                 num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    if len(outs) == 1:
        out = outs[0][:, :, 0]  # [B, Hkv, G, D]
    else:
        out = merge_splits_pallas([tuple(outs)], q.dtype, interpret=interpret)
    return out.reshape(batch, 1, num_heads, head_dim)


def paged_decode_partials(
    q: jax.Array,  # [B, 1, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, 1]
    kv_lens: jax.Array,  # i32[B]
    kv_starts: jax.Array | None,  # i32[B] first key of each row to attend to (page-aligned); None: 0
    *,
    scale: float,
    pages_per_block: int | None,
    k_splits: int | None,
    final_if_one_split: bool,
    num_warps: int | None,
    num_stages: int | None,
    interpret: bool,
) -> list[jax.Array]:
    """The decode kernel's raw outputs: per-split f32 o[B, Hkv, S, G, D], l and m [B, Hkv, S, G] for
    `merge_splits`; or, with one split and `final_if_one_split`, just the final o[B, Hkv, 1, G, D] in
    q.dtype. Keys before `kv_starts` are left out, for a caller that attends to them another way."""
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    pool = pool_inputs(k_pages, v_pages)
    pages_per_seq = block_tables.shape[1]
    if num_q != 1:
        raise ValueError(f"decode kernel takes one query token per row, got T={num_q}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
    group = num_heads // num_kv_heads
    rows = max(MIN_DOT_ROWS, next_pow2(group))
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size)
    if num_warps is None:
        num_warps = default_num_warps(isinstance(k_pages, QuantizedPages), pages_per_block)
    # Loads need power-of-two sizes, and a compute block may run past the table's end: pad the table
    # (pad slots are never dereferenced, see the kernel's masked table load).
    if not all(is_pow2(n) for n in (pages_per_block, page_size, head_dim)):
        raise ValueError(f"{pages_per_block=}, {page_size=} and {head_dim=} must be powers of two")
    padded_pps = pl.cdiv(pages_per_seq, pages_per_block) * pages_per_block
    if padded_pps != pages_per_seq:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, padded_pps - pages_per_seq)))
    if k_splits is None:
        k_splits = default_k_splits(batch, num_kv_heads, padded_pps // pages_per_block,
                                    pages_per_block * page_size)
    if num_stages is None:
        num_stages = default_num_stages(isinstance(k_pages, QuantizedPages), batch * num_kv_heads * k_splits)
    if kv_starts is None:
        kv_starts = jnp.zeros((batch,), jnp.int32)
    with_stats = k_splits > 1 or not final_if_one_split

    q_grouped = q.reshape(batch, num_kv_heads, group, head_dim)  # head h*G + g -> [h, g]
    kernel = functools.partial(
        _decode_kernel,
        num_pool=len(pool.arrays),
        kind=pool.kind,
        page_size=page_size,
        group=group,
        rows=rows,
        pages_per_seq=pages_per_seq,
        pages_per_block=pages_per_block,
        k_splits=k_splits,
        scale_log2=scale * LOG2_E,
    )
    row_scalar = pl.BlockSpec((1,), lambda b, h, s: (b,))
    in_specs = [
        pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
        *pool_specs(pool, lambda b, h, s: h),
        pl.BlockSpec((None, padded_pps), lambda b, h, s: (b, 0)),
        pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
        row_scalar,
        row_scalar,
    ]
    # Final output in q.dtype, or f32 partials plus (l, m) for a merge.
    out_dtype = jnp.float32 if with_stats else q.dtype
    out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, k_splits, group, head_dim), out_dtype)]
    out_specs = [pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s: (b, h, s, 0, 0))]
    if with_stats:
        stat_shape = jax.ShapeDtypeStruct((batch, num_kv_heads, k_splits, group), jnp.float32)
        stat_spec = pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0))
        out_shape += [stat_shape, stat_shape]
        out_specs += [stat_spec, stat_spec]

    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        # Rows on axis 0 (CUDA's x, dispatched fastest): the programs resident at one moment are all rows
        # of one (head, split), so rows sharing prefix pages read them from L2 (docs/perf-notes.md, B4).
        grid=(batch, num_kv_heads, k_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"xlserve_paged_decode_ppb{pages_per_block}_ks{k_splits}",
    )(q_grouped, *pool.arrays, block_tables.astype(jnp.int32), q_positions.astype(jnp.int32),
      kv_lens.astype(jnp.int32), kv_starts.astype(jnp.int32))


def merge_splits(
    o: jax.Array,  # f32[B, Hkv, S, G, D] per-split outputs, each normalised by its own l
    l: jax.Array,  # f32[B, Hkv, S, G] per-split softmax denominators
    m: jax.Array,  # f32[B, Hkv, S, G] per-split running max (log2 domain)
) -> jax.Array:  # f32[B, Hkv, G, D]
    """Log-sum-exp merge of the splits: weight each split by its share l * 2^(m - max m). The reference
    of `merge_splits_pallas`, which the kernels use."""
    weight = l * jnp.exp2(m - m.max(axis=2, keepdims=True))  # empty splits have l == 0 -> weight 0
    total = weight.sum(axis=2)
    # An empty split never wrote its o (uninitialised memory): select, never multiply, it away.
    out = jnp.where(weight[..., None] > 0, o * weight[..., None], 0.0).sum(axis=2)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def _merge_kernel(*refs, num_parts: int):
    """One (row, KV head, query head): `merge_splits` over every part's splits, in one pass."""
    parts, out_ref = [refs[3 * i : 3 * i + 3] for i in range(num_parts)], refs[-1]
    loaded = [(o_ref[...], l_ref[...], m_ref[...]) for o_ref, l_ref, m_ref in parts]  # [S, D], [S], [S]
    m_max = functools.reduce(jnp.maximum, [m.max() for _, _, m in loaded])
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for o, l, m in loaded:
        weight = l * jnp.exp2(m - m_max)  # empty splits have l == 0 -> weight 0
        # An empty split never wrote its o (uninitialised memory): select, never multiply, it away.
        acc += jnp.where(weight[:, None] > 0, o * weight[:, None], 0.0).sum(axis=0)
        total += weight.sum()
    out_ref[...] = (acc / jnp.where(total > 0, total, 1.0)).astype(out_ref.dtype)


def merge_splits_pallas(
    parts: list[tuple[jax.Array, jax.Array, jax.Array]],  # each (o f32[B, Hkv, S, G, D], l, m f32[B, Hkv, S, G])
    out_dtype: jnp.dtype,
    *,
    interpret: bool = False,
) -> jax.Array:  # [B, Hkv, G, D] in out_dtype
    """`merge_splits` over the concatenated splits of `parts` as one kernel, cast included: XLA runs the
    merge as 3-4 small fusions a layer, ~1.5 us each, which at batch 1 is ~2% of a decode step
    (docs/perf-notes.md). Split counts must be powers of two (Triton loads)."""
    batch, num_kv_heads, _, group, head_dim = parts[0][0].shape
    if not all(is_pow2(o.shape[2]) for o, _, _ in parts):
        raise ValueError(f"split counts must be powers of two, got {[o.shape[2] for o, _, _ in parts]}")
    in_specs = []
    for o, _, _ in parts:
        splits = o.shape[2]
        stat = pl.BlockSpec((None, None, splits, None), lambda b, h, g: (b, h, 0, g))
        in_specs += [pl.BlockSpec((None, None, splits, None, head_dim), lambda b, h, g: (b, h, 0, g, 0)), stat, stat]
    return pl.pallas_call(
        functools.partial(_merge_kernel, num_parts=len(parts)),
        out_shape=jax.ShapeDtypeStruct((batch, num_kv_heads, group, head_dim), out_dtype),
        grid=(batch, num_kv_heads, group),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, head_dim), lambda b, h, g: (b, h, g, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="xlserve_merge_splits",
    )(*(x for part in parts for x in part))
