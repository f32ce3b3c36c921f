"""Weights stored quantized (`--weight-quant int8|fp8`): per-output-channel scales, and matmuls that never
build a dequantized copy of a weight.

A quantizable weight contracts its leading `in_dims` dimensions with the activation's last one and keeps
the rest as output channels (model/loader.py declares `in_dims` for each). Quantized, it is `values` of
the same shape and an f32 `scale` over the output channels, symmetric: w = values * scale. int8 values are
int8; fp8 values are float8_e4m3fn, except on CPU, where they are kept as their bytes (uint8) and
reinterpreted where they are used: XLA:CPU, which has no fp8 arithmetic, converts every fp8 array to f16
as a whole on entry, whatever uses it.

Since the scale is per output channel, it multiplies the matmul's *output*: x @ w = (x @ values) * scale,
so only the conversion of `values` to the activation dtype is left, and where it runs decides whether a
weight-sized temporary exists:
    fused    (GPU) the convert is an operand of the dot: XLA:GPU fuses it into its GEMM fusion, so each
             tile of the weight is converted after its load from memory, at one row too (a split-K Triton
             GEMM at Llama-3.1-8B's shapes on the H100). Only at small shapes (the test models') does XLA turn
             a one-row dot into multiply + reduce, which can write an f32 product of the weight.
    blocked  (CPU) XLA:CPU runs a dot's operands as buffers of their own (it would convert the whole weight
             first), so the weight is converted and multiplied a block of output columns at a time in a
             loop: the temporary is one block (`BLOCK_ELEMENTS`), never the weight.
The decode step's memory analysis (tests/test_weight_quant.py) holds the CPU path to that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

WEIGHT_FORMATS = ("int8", "fp8")
_STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}
# Weight elements converted per iteration of the CPU loop: 256 KiB of f32, far below any matrix worth quantizing.
BLOCK_ELEMENTS = 1 << 16


def storage_dtype(kind: str) -> jnp.dtype:
    """The dtype quantized values are stored in on this backend (see the module docstring for fp8 on CPU)."""
    if kind == "fp8" and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.uint8)
    return jnp.dtype(_STORAGE[kind])


@dataclass(frozen=True)
class QuantizedWeight:
    values: jax.Array  # the weight's shape, int8 or float8_e4m3fn
    scale: jax.Array  # f32[values.shape[in_dims:]]: one per output channel
    in_dims: int = 1  # static: leading dimensions contracted by the matmul


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["values", "scale"], meta_fields=["in_dims"])

Weight = jax.Array | QuantizedWeight


def quantize_weight(w: jax.Array, kind: str, in_dims: int) -> tuple[jax.Array, jax.Array]:
    """(values, f32 scale per output channel) of `w`, whose leading `in_dims` dimensions are its inputs."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=tuple(range(in_dims))) / _QMAX[kind]
    scaled = jnp.clip(w / jnp.where(scale > 0, scale, 1.0), -_QMAX[kind], _QMAX[kind])
    if kind == "int8":
        return jnp.round(scaled).astype(jnp.int8), scale
    values = scaled.astype(jnp.float8_e4m3fn)
    if storage_dtype(kind) == jnp.uint8:
        values = jax.lax.bitcast_convert_type(values, jnp.uint8)
    return values, scale


def decode(values: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Stored values (int8, e4m3, or e4m3's bytes) as `dtype`: exact, every format fits bf16's significand."""
    if values.dtype == jnp.uint8:
        values = jax.lax.bitcast_convert_type(values, jnp.float8_e4m3fn)
    return values.astype(dtype)


def matmul_strategy() -> str:
    """"blocked" on CPU, "fused" elsewhere (see the module docstring)."""
    return "blocked" if jax.default_backend() == "cpu" else "fused"


def linear(x: jax.Array, w: Weight, in_dims: int = 1, strategy: str | None = None) -> jax.Array:
    """x [..., K] times w [*in, *out] with K = prod(in) (the leading `in_dims` dims): [..., *out] in x.dtype
    (f32 accumulation for a quantized weight)."""
    out_shape = w.shape[in_dims:] if not isinstance(w, QuantizedWeight) else w.values.shape[in_dims:]
    if not isinstance(w, QuantizedWeight):
        if in_dims == 1:
            return jnp.tensordot(x, w, axes=1)
        # As one [K, N] matrix (a free reshape): contracting several dims let XLA:CPU copy the weight's layout.
        return (x @ w.reshape(math.prod(w.shape[:in_dims]), -1)).reshape(*x.shape[:-1], *out_shape)
    # [K, *out]: only the input dims are merged. Merging the output dims too would cost nothing on one
    # device, but under tensor parallelism [2, F] with F split (w_gate_up) is no contiguous split of 2F,
    # and GSPMD would gather the whole weight onto every device (tests/test_tensor_parallel.py).
    values = w.values.reshape(math.prod(w.values.shape[:in_dims]), *out_shape)
    rows = x.reshape(-1, x.shape[-1])
    if (strategy or matmul_strategy()) == "fused":
        y = jnp.tensordot(rows, decode(values, x.dtype), axes=1, preferred_element_type=jnp.float32) * w.scale
    else:  # CPU: one device in practice (its loop slices the output columns, which GSPMD would gather)
        y = _blocked(rows, values.reshape(values.shape[0], -1), w.scale.reshape(-1))
    return y.astype(x.dtype).reshape(*x.shape[:-1], *out_shape)


def _blocked(x: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:  # f32[M, N]
    """(x @ values) * scale, converting `values` one block of output columns per loop iteration."""
    k, n = values.shape
    block = column_block(n, k)

    def body(i: jax.Array, out: jax.Array) -> jax.Array:
        cols = decode(jax.lax.dynamic_slice_in_dim(values, i * block, block, axis=1), x.dtype)
        part = jnp.dot(x, cols, preferred_element_type=jnp.float32)
        part = part * jax.lax.dynamic_slice_in_dim(scale, i * block, block)
        return jax.lax.dynamic_update_slice_in_dim(out, part, i * block, axis=1)

    return jax.lax.fori_loop(0, n // block, body, jnp.zeros((x.shape[0], n), jnp.float32))


def column_block(n: int, k: int) -> int:
    """The widest divisor of n whose [k, block] slice holds at most BLOCK_ELEMENTS elements (at least 1)."""
    widest = max(1, min(n, BLOCK_ELEMENTS // max(k, 1)))
    return next(b for b in range(widest, 0, -1) if n % b == 0)
