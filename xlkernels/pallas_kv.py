"""K/V page pools inside the Pallas kernels: plain or quantized (`xlkernels.kv_quant`), one code path.

A kernel receives a pool as its refs (`pool_inputs`: k and v, plus their scales when quantized) and reads
a compute block of pages with `load_block`, which hands back whole-token sub-blocks: one for a plain,
int8 or fp8 pool, two for int4 (each page's first and second half of tokens, its low and high nibbles).
The quantized values are converted in registers right after their load, and the scales are applied to
the block's scores (`block_scores`: q.k = s_k * (q . k_q)) and probabilities (`block_values`:
p.v = (p * s_v) . v_q), never to the keys and values themselves.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlkernels.kv_quant import Pages, QuantizedPages, halves_of, unpack_int4


class KVBlock(NamedTuple):
    k: jax.Array  # [n, D] as stored (quantized values still in their storage dtype)
    v: jax.Array  # [n, D]
    k_scale: jax.Array | None  # f32[n], None for a plain pool
    v_scale: jax.Array | None
    key_pos: jax.Array  # i32[n] each key's position in its sequence


class PoolInputs(NamedTuple):
    arrays: tuple[jax.Array, ...]  # k, v (plain), or k, v, k_scale, v_scale (quantized)
    kind: str | None  # the quantized format, None for a plain pool
    page_size: int  # tokens per page


def pool_inputs(k_pages: Pages, v_pages: Pages) -> PoolInputs:
    """The arrays a kernel takes for the two pools, their format and page size."""
    if isinstance(k_pages, QuantizedPages):
        return PoolInputs((k_pages.data, v_pages.data, k_pages.scale, v_pages.scale), k_pages.kind,
                          k_pages.page_size)
    return PoolInputs((k_pages, v_pages), None, k_pages.shape[2])


def pool_specs(pool: PoolInputs, index_map) -> list[pl.BlockSpec]:
    """BlockSpecs giving each program one KV head's whole pools; `index_map(*grid) -> the KV head`."""
    return [pl.BlockSpec((None, *a.shape[1:]), lambda *grid: (index_map(*grid), 0, 0, 0)) for a in pool.arrays]


def load_block(pool_refs, kind: str | None, pages: jax.Array, page0: jax.Array, *, pages_per_block: int,
               page_size: int) -> list[KVBlock]:
    """The pages `pages` (table slots page0 .. page0 + pages_per_block) as whole-token sub-blocks."""
    k_ref, v_ref = pool_refs[:2]
    head_dim = k_ref.shape[-1]
    halves = halves_of(kind) if kind else 1
    per_page = page_size // halves
    size = pages_per_block * per_page
    k_raw, v_raw = k_ref[pages], v_ref[pages]  # [pages_per_block, PS / halves, D]
    ks, vs = (unpack_int4(k_raw), unpack_int4(v_raw)) if kind == "int4" else ((k_raw,), (v_raw,))
    slots = page0 + jnp.arange(pages_per_block, dtype=jnp.int32)
    blocks = []
    for half in range(halves):
        key_pos = slots[:, None] * page_size + half * per_page + jnp.arange(per_page, dtype=jnp.int32)[None, :]
        scales = (None, None)
        if kind is not None:
            # One indexer (half, pages): Triton's lowering takes no chain of them (ref.at[half][pages]).
            scales = tuple(ref[half, pages].reshape(size).astype(jnp.float32) for ref in pool_refs[2:])
        blocks.append(KVBlock(ks[half].reshape(size, head_dim), vs[half].reshape(size, head_dim), *scales,
                              key_pos.reshape(size)))
    return blocks


def block_scores(q: jax.Array, block: KVBlock, scale: float) -> jax.Array:
    """f32[rows, n]: q . k * scale for the block's keys (dequantized through the scores)."""
    if block.k_scale is None:
        return plgpu.dot(q, block.k, trans_b=True) * scale
    return plgpu.dot(q, block.k.astype(q.dtype), trans_b=True) * (block.k_scale * scale)[None, :]


def block_values(p: jax.Array, block: KVBlock, dtype: jnp.dtype) -> jax.Array:
    """f32[rows, D]: p . v for the block's values (dequantized through the probabilities)."""
    if block.v_scale is None:
        return plgpu.dot(p.astype(block.v.dtype), block.v)
    return plgpu.dot((p * block.v_scale[None, :]).astype(dtype), block.v.astype(dtype))
