"""The residual add and RMSNorm in one Pallas GPU kernel (Triton lowering); see `xlkernels.rms_norm`.

grid = (rows,): one program per token row reads x and delta once, writes their sum and its norm. The
row (the hidden size E) is one block, so E must be a power of two (Triton loads); other sizes take
the XLA reference, which is correct, only a few kernels slower.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlkernels.pallas_decode import is_pow2
from xlkernels.rms_norm import add_rms_norm_reference

# Warps a program: 4 over a delta in the activations' dtype, 8 over a quantized product's f32 sums and their
# scale (twice the bytes to load before the sum), with which the one-row kernel runs as fast as over bf16 with 4
# (measured on the H100: docs/perf-notes.md, "Twenty-sixth session").
NUM_WARPS, SCALED_NUM_WARPS = 4, 8


def _add_rms_norm_kernel(*refs, has_delta: bool, has_delta_scale: bool, eps: float):
    if has_delta:
        x_ref, delta_ref, *delta_scale_ref, scale_ref, total_ref, normed_ref = refs
        delta = delta_ref[...]
        if has_delta_scale:  # a quantized weight's f32 sums: scaled and rounded as `linear` would have
            delta = (delta * delta_scale_ref[0][...]).astype(x_ref.dtype)
        total = x_ref[...] + delta  # rounded to the activations' dtype, as the unfused add is
        total_ref[...] = total
    else:
        x_ref, scale_ref, normed_ref = refs
        total = x_ref[...]
    x32 = total.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32) + eps)
    normed_ref[...] = scale_ref[...] * normed.astype(normed_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm_pallas(
    x: jax.Array,  # [..., E] the residual stream
    delta: jax.Array | None,  # [..., E] a branch's output to add first; None: nothing to add
    scale: jax.Array,  # [E]
    eps: float,
    delta_scale: jax.Array | None = None,  # f32[E]: delta is a quantized weight's f32 sums, times this, rounded
    *,
    num_warps: int | None = None,  # None: NUM_WARPS, or SCALED_NUM_WARPS with a delta_scale
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # (x + delta, rms_norm(x + delta)), both [..., E] in x.dtype
    hidden = x.shape[-1]
    if not is_pow2(hidden):
        return add_rms_norm_reference(x, delta, scale, eps, delta_scale)
    rows = x.reshape(-1, hidden)
    row_spec, vector_spec = pl.BlockSpec((None, hidden), lambda r: (r, 0)), pl.BlockSpec((hidden,), lambda r: (0,))
    has_delta_scale = delta is not None and delta_scale is not None
    num_warps = num_warps or (SCALED_NUM_WARPS if has_delta_scale else NUM_WARPS)
    operands = [rows] + ([] if delta is None else [delta.reshape(-1, hidden)])
    operands += [delta_scale.astype(jnp.float32)] if has_delta_scale else []
    out_shape = jax.ShapeDtypeStruct(rows.shape, x.dtype)
    outs = pl.pallas_call(
        functools.partial(_add_rms_norm_kernel, has_delta=delta is not None, has_delta_scale=has_delta_scale,
                          eps=eps),
        out_shape=[out_shape] * (1 if delta is None else 2),
        grid=(rows.shape[0],),
        in_specs=[row_spec] * (1 + (delta is not None)) + [vector_spec] * (1 + has_delta_scale),
        out_specs=[row_spec] * (1 if delta is None else 2),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="xlserve_add_rms_norm",
    )(*operands, scale.astype(x.dtype))
    total = x if delta is None else outs[0].reshape(x.shape)
    return total, outs[-1].reshape(x.shape)
