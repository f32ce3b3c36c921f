"""Few-row products on CPU by native kernels (`cpu_matmul.cc`, built and registered by
`xlkernels.native_build`).

`rows_matmul(x, w)` is x [M, K] @ w.T for a weight stored inputs-last, w [N, K] (every CPU matmul weight
is, model/weight_quant.py): 1..MAX_ROWS float32 rows over a float32 weight, or one float32 row over a
bfloat16 weight (`--weight-quant bf16`, whose products of more rows XLA:CPU runs on the AMX tiles).
`native_matmul_applies` says where it can run (callers keep XLA's dot elsewhere, or where the kernels
could not be built).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlkernels.native_build import native_kernels_ready

# native_build.TARGETS, by the weight's dtype
TARGETS = {jnp.dtype(jnp.float32): "xlserve_rows_matmul_f32", jnp.dtype(jnp.bfloat16): "xlserve_row_matmul_bf16"}
# Rows each kernel takes: f32 keeps one input position's rows in one 16-lane vector; bf16 is one row's.
MAX_ROWS = {jnp.dtype(jnp.float32): 16, jnp.dtype(jnp.bfloat16): 1}


def native_matmul_applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether `rows_matmul` runs these operands natively: float32 x [M, K] and w [N, K] (float32 for
    1..16 rows, bfloat16 for one) on one CPU device. With several devices XLA would partition around the
    custom call by gathering its operands (a tensor-parallel weight onto every device), so those keep XLA's
    dot."""
    return (x.ndim == 2 and w.ndim == 2 and 1 <= x.shape[0] <= MAX_ROWS.get(jnp.dtype(w.dtype), 0)
            and x.shape[1] == w.shape[1] and x.dtype == jnp.float32 and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and native_kernels_ready())


def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:  # f32[M, N]
    """x [M, K] times w [N, K] (inputs last) as f32[M, N] by the native kernel (only where
    `native_matmul_applies`)."""
    call = jax.ffi.ffi_call(TARGETS[jnp.dtype(w.dtype)], jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x, w)
