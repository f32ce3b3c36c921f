"""RMSNorm, and the residual add fused into it, behind the same backend switch as attention.

Every decoder layer adds a branch's output to the residual stream and normalises the sum for the next
branch: `x = x + delta; h = rms_norm(x)`. XLA runs that as three small kernels (the add, the
mean-of-squares reduction, the scaling), ~1.5 us each, which at batch 1 is ~5% of a decode step; the
Pallas kernel (`xlkernels.pallas_rms_norm`) does it in one. Both compute what transformers computes:
the sum rounded to the activations' dtype, normalised in f32, cast back, then scaled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# (x, delta, scale, eps, delta_scale=None) -> (x + delta, normed)
AddRMSNorm = Callable[..., tuple[jax.Array, jax.Array]]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as transformers computes it: normalise in f32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


def add_rms_norm_reference(
    x: jax.Array,  # [..., E] the residual stream
    delta: jax.Array | None,  # [..., E] a branch's output to add first; None: nothing to add
    scale: jax.Array,  # [E]
    eps: float,
    delta_scale: jax.Array | None = None,  # f32[E]: delta is a quantized weight's f32 sums, times this, rounded
) -> tuple[jax.Array, jax.Array]:  # (x + delta, rms_norm(x + delta)), both [..., E] in x.dtype
    if delta is not None and delta_scale is not None:
        delta = (delta * delta_scale).astype(x.dtype)
    total = x if delta is None else x + delta
    return total, rms_norm(total, scale, eps)


def get_add_rms_norm(backend: str) -> AddRMSNorm:
    """The fused add + RMSNorm for `backend` (any of `xlkernels.BACKENDS`, as `get_paged_attention`)."""
    from xlkernels import resolve_backend

    resolved = resolve_backend(backend)
    if resolved in ("xla", "cpu"):
        return add_rms_norm_reference
    from xlkernels.pallas_rms_norm import add_rms_norm_pallas  # the Triton lowering only where it is used

    return functools.partial(add_rms_norm_pallas, interpret=resolved == "pallas-interpret")
