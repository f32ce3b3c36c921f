"""Few-row float32 products on CPU by a native kernel (`cpu_matmul.cc`, built and registered by
`xlkernels.native_build`).

`rows_matmul(x, w)` is x [M, K] @ w.T for a weight stored inputs-last, w [N, K] (every CPU matmul weight
is, model/weight_quant.py), for 1..MAX_ROWS float32 rows; `native_matmul_applies` says where it can run
(callers keep XLA's dot elsewhere, or where the kernel could not be built).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlkernels.native_build import native_kernels_ready

TARGET = "xlserve_rows_matmul_f32"  # one of native_build.TARGETS
MAX_ROWS = 16  # the kernel keeps one input position's rows in one 16-lane vector


def native_matmul_applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether `rows_matmul` runs these operands natively: float32 x [1..MAX_ROWS, K] and w [N, K] on one
    CPU device. With several devices XLA would partition around the custom call by gathering its operands
    (a tensor-parallel weight onto every device), so those keep XLA's dot."""
    return (x.ndim == 2 and w.ndim == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.shape[1] == w.shape[1]
            and x.dtype == jnp.float32 and w.dtype == jnp.float32 and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and native_kernels_ready())


def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:  # f32[M, N]
    """x [M, K] times w [N, K] (inputs last) as f32[M, N] by the native kernel (only where
    `native_matmul_applies`)."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x, w)
