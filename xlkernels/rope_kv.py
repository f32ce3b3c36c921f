"""Rotary embedding of a step's queries and keys, and the keys' and values' cache writes, behind the backend switch.

After the qkv matmul every layer turns its queries and keys by their positions' angles and stores the keys
and values in their pages. XLA runs that as four small kernels a layer (two rotations, two scatters), ~1.3-1.9
us each on the H100, ~0.2 ms of a batch-1 decode step over 32 layers; the Pallas kernel
(`xlkernels.pallas_rope_kv`) does it in one. Both compute what `rotate` and `write_kv_pages` compute.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from xlkernels.kv_quant import Pages
from xlkernels.paged_attention import write_kv_pages

# (qkv [B, T, Hkv, G+2, D], cos, sin f32[B, T, 1, D/2], k_pages, v_pages, block_tables, positions, valid, *, dtype)
#   -> (q [B, T, Hkv * G, D] turned, k_pages, v_pages); qkv_scale=f32[Hkv, G+2, D]: qkv is a quantized weight's f32
#   sums, times this, rounded to dtype first (`model.weight_quant.Scaled`)
RopeWrite = Callable[..., tuple[jax.Array, Pages, Pages]]


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout (first half real, second half imaginary), in f32, rounded back."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x32 = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return x32.astype(x.dtype)


def rope_write_reference(
    qkv: jax.Array,  # [B, T, Hkv, G+2, D]: each KV head's G query heads, then its key and its value
    cos: jax.Array,  # f32[B, T, 1, D/2]
    sin: jax.Array,  # f32[B, T, 1, D/2]
    k_pages: Pages,  # [Hkv, P, PS, D]
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    positions: jax.Array,  # i32[B, T]
    valid: jax.Array,  # bool[B, T]; padding tokens are not written
    *,
    dtype: jnp.dtype,  # the activations'
    qkv_scale: jax.Array | None = None,  # f32[Hkv, G+2, D]: qkv is a quantized weight's f32 sums, times this
) -> tuple[jax.Array, Pages, Pages]:  # (q [B, T, Hkv * G, D] in dtype, k_pages, v_pages)
    qkv = (qkv if qkv_scale is None else qkv * qkv_scale).astype(dtype)
    batch, tokens, num_kv_heads, width, head_dim = qkv.shape
    q = rotate(qkv[:, :, :, : width - 2].reshape(batch, tokens, -1, head_dim), cos, sin)
    k = rotate(qkv[:, :, :, width - 2], cos, sin)
    k_pages, v_pages = write_kv_pages(k_pages, v_pages, k, qkv[:, :, :, width - 1], block_tables, positions, valid)
    return q, k_pages, v_pages


def get_rope_write(backend: str) -> RopeWrite:
    """The rotation and cache write for `backend` (any of `xlkernels.BACKENDS`, as `get_paged_attention`)."""
    from xlkernels import resolve_backend

    resolved = resolve_backend(backend)
    if resolved in ("xla", "cpu"):
        return rope_write_reference
    from xlkernels.pallas_rope_kv import rope_write_pallas  # the Triton lowering only where it is used

    return functools.partial(rope_write_pallas, interpret=resolved == "pallas-interpret")
