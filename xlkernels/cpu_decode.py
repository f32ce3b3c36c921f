"""Decode attention on CPU by a native kernel (`cpu_decode.cc`), built on first use with the host's C++
compiler against the XLA FFI headers jaxlib ships, and cached.

`paged_attention_cpu` is the "cpu" backend: one float32 or bfloat16 query token per row (widened to float32)
over plain float32 or bfloat16 pages (bf16: `serving.engine.engine.kv_page_dtype`; stored as their bits,
`kv_quant.BF16_BITS`) runs the native kernel, which reads each key and value once straight from the page
pool; everything else (prompt chunks, quantized pages, other dtypes, a host without a compiler) runs
`paged_attention_xla`. Same contract and, up to float rounding, the same numbers as the reference.

The kernel is built, cached and registered with the others by `xlkernels.native_build`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlkernels.kv_quant import BF16_BITS, Pages, QuantizedPages
from xlkernels.native_build import native_kernels_ready
from xlkernels.shared_prefix import SharedPrefix
from xlkernels.xla_attention import paged_attention_xla

# By the pool's element type (a bfloat16 pool is stored as its bits on CPU: kv_quant.BF16_BITS); each one of
# native_build.TARGETS.
TARGETS = {jnp.dtype(jnp.float32): "xlserve_paged_decode_f32", BF16_BITS: "xlserve_paged_decode_bf16"}
QUERY_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # the kernel computes in float32


def native_decode_applies(q: jax.Array, k_pages: Pages) -> bool:
    """Whether `paged_attention_cpu` runs these operands natively: one float32 or bfloat16 query token per row
    over plain float32 or bfloat16 pages, on a host whose JAX runs on its CPU (the kernel is registered for
    XLA:CPU only)."""
    return (q.shape[1] == 1 and not isinstance(k_pages, QuantizedPages) and q.dtype in QUERY_DTYPES
            and k_pages.dtype in TARGETS and jax.default_backend() == "cpu" and native_kernels_ready())


def paged_attention_cpu(
    q: jax.Array,  # [B, T, Hq, D]
    k_pages: Pages,  # [Hkv, P, PS, D], or quantized (xlkernels.kv_quant)
    v_pages: Pages,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, T]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    shared: SharedPrefix | None = None,
) -> jax.Array:  # [B, T, Hq, D] in q.dtype
    """`paged_attention_reference`'s contract: the native kernel for decode rows, else `paged_attention_xla`."""
    if not native_decode_applies(q, k_pages):
        return paged_attention_xla(q, k_pages, v_pages, block_tables, q_positions, kv_lens, scale=scale)
    batch, _, num_heads, head_dim = q.shape
    call = jax.ffi.ffi_call(TARGETS[k_pages.dtype], jax.ShapeDtypeStruct((batch, num_heads, head_dim), jnp.float32),
                            vmap_method="sequential")
    out = call(q[:, 0].astype(jnp.float32), k_pages, v_pages, block_tables, q_positions[:, 0], kv_lens,
               scale=np.float32(scale))
    return out[:, None].astype(q.dtype)
