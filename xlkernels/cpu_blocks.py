"""Products over weights kept in a GGUF file's own blocks, on CPU by the native kernel (`cpu_blocks.cc`, built
and registered by `xlkernels.native_build`): the product itself (`blocks_matmul`), or the weight decoded
whole for XLA's dot (`blocks_decode`); where the kernels cannot run, XLA decodes the blocks.

A block weight is uint8 [N, K / 32 * block bytes]: each output channel's K inputs as the file stores them,
in blocks of 32 (`BLOCK_BYTES`). Both paths decode a block exactly as the `gguf` package's `dequantize`
does, so the products are those of the file's float32 weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlkernels.native_build import cpu_has_bf16_tiles, native_kernels_ready

BLOCK = 32  # weights per block
# Rows from which the product runs on AMX tiles, where the CPU has them: a tile product costs 16 rows' work
# whatever the rows, and matches the AVX form's at ~8 (docs/perf-notes.md, "Seventeenth session").
TILES_MIN_ROWS = 9
# Bytes per block: an f16 scale (Q4_1: and an f16 minimum), then 16 bytes of nibbles or 32 signed bytes.
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def blocks_native_applies(x: jax.Array) -> bool:
    """Whether `blocks_matmul` runs natively for float32 rows `x` [M, K]: on one CPU device with the kernels
    built (under tensor parallelism XLA would gather the weight around the custom call)."""
    return (x.ndim == 2 and x.dtype == jnp.float32 and jax.default_backend() == "cpu" and jax.device_count() == 1
            and native_kernels_ready())


def tiles_apply(rows: int) -> bool:
    """Whether a product of `rows` rows runs on AMX tiles by default: the CPU has them, and there are
    TILES_MIN_ROWS rows."""
    return cpu_has_bf16_tiles() and rows >= TILES_MIN_ROWS


def blocks_matmul(x: jax.Array, w: jax.Array, kind: str, tiles: bool | None = None) -> jax.Array:  # f32[M, N]
    """x f32[M, K] times the block weight w u8[N, K / 32 * bytes] transposed, by the native kernel (only where
    `blocks_native_applies`): on AMX tiles (`tiles`; by default where the CPU has them and there are
    TILES_MIN_ROWS rows) if Linux lends them, else in AVX registers; the same float32 products either way."""
    if tiles is None:
        tiles = tiles_apply(x.shape[0])
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(f"xlserve_blocks_matmul_{kind}", out, vmap_method="sequential")
    return call(x, w, tiles=tiles)


def blocks_decode(w: jax.Array, kind: str) -> jax.Array:  # f32[N, K]
    """The block weight w u8[N, K / 32 * bytes] decoded whole by the native kernel (only where
    `blocks_native_applies`), as `dequantize_blocks` decodes it."""
    out = jax.ShapeDtypeStruct((w.shape[0], w.shape[1] // BLOCK_BYTES[kind] * BLOCK), jnp.float32)
    return jax.ffi.ffi_call(f"xlserve_blocks_decode_{kind}", out, vmap_method="sequential")(w)


def _half(pair: jax.Array) -> jax.Array:  # u8[..., 2] -> f32[...]
    return jax.lax.bitcast_convert_type(pair, jnp.float16).astype(jnp.float32)


def dequantize_blocks(w: jax.Array, kind: str) -> jax.Array:  # f32[..., K]
    """The block weight w u8[..., K / 32 * bytes] as float32 [..., K], as gguf's `dequantize` computes it."""
    blocks = w.reshape(*w.shape[:-1], -1, BLOCK_BYTES[kind])  # [..., K / 32, bytes]
    d = _half(blocks[..., 0:2])[..., None]
    if kind == "q8_0":
        codes = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32)
        return (codes * d).reshape(*w.shape[:-1], -1)
    nibbles = blocks[..., 4:] if kind == "q4_1" else blocks[..., 2:]  # [..., K / 32, 16]
    codes = jnp.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(jnp.float32)  # [..., K / 32, 32]
    if kind == "q4_0":
        return ((codes - 8.0) * d).reshape(*w.shape[:-1], -1)
    return (codes * d + _half(blocks[..., 2:4])[..., None]).reshape(*w.shape[:-1], -1)
