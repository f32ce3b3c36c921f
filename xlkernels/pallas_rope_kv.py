"""The rotary embedding and the cache writes of a step in one Pallas GPU kernel (Triton lowering); see
`xlkernels.rope_kv`.

grid = (tokens, KV heads): one program reads one token's slab of one KV head (its G query heads, its key and
its value) once, writes the G turned query heads, and stores the turned key and the value at the token's page
and slot, in place: the pools are aliased to the outputs, so only those two rows of each are written. The halves
of each head are loaded apart, so no concatenation is needed. Padding tokens write nothing.

Quantized pools, and shapes whose G or D/2 is not a power of two (Triton's tensors), take the XLA reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlkernels.kv_quant import Pages, QuantizedPages
from xlkernels.paged_attention import token_slots
from xlkernels.pallas_decode import is_pow2
from xlkernels.rope_kv import rope_write_reference


def _rope_write_kernel(qkv_ref, *refs, group: int, half: int, num_pages: int, has_scale: bool):
    scale_ref, (cos_ref, sin_ref, page_ref, slot_ref, _k_in, _v_in, q_ref, k_ref, v_ref) = (
        (refs[0], refs[1:]) if has_scale else (None, refs))
    n, h = pl.program_id(0), pl.program_id(1)
    cos, sin = cos_ref[n, :], sin_ref[n, :]  # f32[D/2]
    first, second = pl.ds(0, half), pl.ds(half, half)

    def load(heads, part) -> jax.Array:  # qkv's rows in the activations' dtype (q's): f32 sums scaled, rounded
        x = qkv_ref[n, h, heads, part]
        return x if scale_ref is None else (x * scale_ref[h, heads, part]).astype(q_ref.dtype)

    def turned(x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:  # as `rope_kv.rotate`: in f32
        x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    heads = pl.ds(0, group)
    q1, q2 = turned(load(heads, first), load(heads, second))  # f32[G, D/2]
    q_ref[n, h, heads, first] = q1.astype(q_ref.dtype)
    q_ref[n, h, heads, second] = q2.astype(q_ref.dtype)
    page, slot = page_ref[n], slot_ref[n]

    @pl.when(page < num_pages)  # padding tokens carry an out-of-range page
    def _():
        k1, k2 = turned(load(group, first), load(group, second))
        # Rounded to the activations' dtype first, as the reference's rotate is, then stored in the pool's.
        k_ref[h, page, slot, first] = k1.astype(q_ref.dtype).astype(k_ref.dtype)
        k_ref[h, page, slot, second] = k2.astype(q_ref.dtype).astype(k_ref.dtype)
        v_ref[h, page, slot, :] = load(group + 1, pl.ds(0, 2 * half)).astype(v_ref.dtype)


def fits(qkv: jax.Array, k_pages: Pages) -> bool:
    """Whether the kernel takes these shapes and this pool (else the reference runs)."""
    group, head_dim = qkv.shape[-2] - 2, qkv.shape[-1]
    return (not isinstance(k_pages, QuantizedPages) and k_pages.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
            and is_pow2(group) and head_dim % 2 == 0 and is_pow2(head_dim // 2))


@functools.partial(jax.jit, static_argnames=("dtype", "interpret"))
def rope_write_pallas(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: Pages, v_pages: Pages,
                      block_tables: jax.Array, positions: jax.Array, valid: jax.Array, *, dtype: jnp.dtype,
                      qkv_scale: jax.Array | None = None, interpret: bool = False) -> tuple[jax.Array, Pages, Pages]:
    """`rope_kv.rope_write_reference`'s contract (shapes there); `interpret=True` runs the kernel on CPU."""
    if not fits(qkv, k_pages):
        return rope_write_reference(qkv, cos, sin, k_pages, v_pages, block_tables, positions, valid, dtype=dtype,
                                    qkv_scale=qkv_scale)
    batch, tokens, num_kv_heads, width, head_dim = qkv.shape
    group, half = width - 2, head_dim // 2
    num_pages = k_pages.shape[1]
    page, slot = token_slots(block_tables, positions, valid, num_pages, k_pages.shape[2])  # i32[N] each
    flat = batch * tokens
    scale = [] if qkv_scale is None else [qkv_scale.astype(jnp.float32)]
    scaled = len(scale)
    q, k_pages, v_pages = pl.pallas_call(
        functools.partial(_rope_write_kernel, group=group, half=half, num_pages=num_pages,
                          has_scale=qkv_scale is not None),
        out_shape=[jax.ShapeDtypeStruct((flat, num_kv_heads, group, head_dim), dtype),
                   jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        grid=(flat, num_kv_heads),
        input_output_aliases={5 + scaled: 1, 6 + scaled: 2},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="xlserve_rope_write",
    )(qkv.reshape(flat, num_kv_heads, width, head_dim), *scale, cos.reshape(flat, half), sin.reshape(flat, half),
      page, slot, k_pages, v_pages)
    return q.reshape(batch, tokens, num_kv_heads * group, head_dim), k_pages, v_pages
