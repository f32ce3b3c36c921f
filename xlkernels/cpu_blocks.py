"""Products over weights kept in a GGUF file's own blocks, on CPU by the native kernel (`cpu_blocks.cc`, built
and registered by `xlkernels.native_build`): the product itself (`blocks_matmul`), or the weight decoded
whole for XLA's dot (`blocks_decode`); where the kernels cannot run, XLA decodes the blocks.

A block weight is uint8 [N, K / 32 * block bytes]: each output channel's K inputs as the file stores them,
in blocks of 32 (`BLOCK_BYTES`). Both paths decode a block exactly as the `gguf` package's `dequantize`
does, so the products are those of the file's float32 weights.

On a CPU with AVX-512 and without AMX tiles, block weights are stored in the lanes layout instead (`to_lanes`,
where `lanes_applies`): the same bytes, each group of 16 output channels reordered block by block so that a
vector holds one element of 16 channels (scales together, then code byte j of the 16 channels together). The
kernel's lanes form multiplies it with no sums across lanes: ~1.45x the file layout's dot form on a Zen 4 core
(docs/perf-notes.md, "Twenty-first session"). The tile form (AMX) reads the file's layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlkernels.native_build import cpu_has_avx512, cpu_has_bf16_tiles, native_kernels_ready

BLOCK = 32  # weights per block
# Rows from which the product runs on AMX tiles, where the CPU has them: a tile product costs 16 rows' work
# whatever the rows, and matches the AVX form's at ~8 (docs/perf-notes.md, "Seventeenth session").
TILES_MIN_ROWS = 9
# Bytes per block: an f16 scale (Q4_1: and an f16 minimum), then 16 bytes of nibbles or 32 signed bytes.
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
# Bytes of float16 before a block's codes: its scale (and Q4_1's minimum).
HEADER_BYTES = {"q4_0": 2, "q4_1": 4, "q8_0": 2}
LANES = 16  # output channels a group of the lanes layout holds: one float32 vector of AVX-512


def lanes_applies(shape: tuple[int, ...]) -> bool:
    """Whether a block weight of values `shape` [..., N, K / 32 * bytes] is stored in the lanes layout: on a CPU
    with AVX-512 and without AMX tiles, with its last output dimension N in whole groups of 16."""
    return len(shape) >= 2 and shape[-2] % LANES == 0 and cpu_has_avx512() and not cpu_has_bf16_tiles()


def to_lanes(values: jax.typing.ArrayLike, kind: str) -> jax.Array:  # u8[..., N, K / 32 * bytes], the same shape
    """A block weight in the file's layout as the lanes layout: each group of 16 channels' bytes (16 rows) as
    [K / 32 blocks][the 16 scales (and minimums) as float16s, then the codes byte by byte: byte j of the 16
    channels together]."""
    *lead, n, width = values.shape
    size, header = BLOCK_BYTES[kind], HEADER_BYTES[kind]
    blocks = jnp.swapaxes(jnp.reshape(values, (*lead, n // LANES, LANES, width // size, size)), -3, -2)
    halves = jnp.swapaxes(jnp.reshape(blocks[..., :header], (*blocks.shape[:-1], header // 2, 2)), -3, -2)
    codes = jnp.swapaxes(blocks[..., header:], -2, -1)  # [..., G, blocks, codes, 16]
    group = jnp.concatenate([jnp.reshape(a, (*blocks.shape[:-2], -1)) for a in (halves, codes)], axis=-1)
    return jnp.reshape(group, values.shape)


def from_lanes(values: jax.typing.ArrayLike, kind: str) -> jax.Array:  # u8[..., N, K / 32 * bytes], the same shape
    """The lanes layout (`to_lanes`) back in the file's layout."""
    *lead, n, width = values.shape
    size, header = BLOCK_BYTES[kind], HEADER_BYTES[kind]
    group = jnp.reshape(values, (*lead, n // LANES, width // size, LANES * size))
    halves = jnp.reshape(group[..., : LANES * header], (*group.shape[:-1], header // 2, LANES, 2))
    halves = jnp.reshape(jnp.swapaxes(halves, -3, -2), (*group.shape[:-1], LANES, header))
    codes = jnp.swapaxes(jnp.reshape(group[..., LANES * header:], (*group.shape[:-1], size - header, LANES)), -2, -1)
    blocks = jnp.swapaxes(jnp.concatenate([halves, codes], axis=-1), -3, -2)  # [..., G, 16, blocks, bytes]
    return jnp.reshape(blocks, values.shape)


def take_block_rows(values: jax.Array, index: jax.Array, kind: str, lanes: bool) -> jax.Array:
    """Rows `index` of a block weight u8[N, K / 32 * bytes] in the file's layout, u8[*index.shape, K / 32 *
    bytes]: in the lanes layout each row is gathered with its group and picked out of it."""
    if not lanes:
        return jnp.take(values, index, axis=0)
    groups = jnp.reshape(values, (-1, LANES * values.shape[-1]))
    rows = from_lanes(jnp.reshape(jnp.take(groups, index // LANES, axis=0), (*index.shape, LANES, values.shape[-1])),
                      kind)
    return jnp.take_along_axis(rows, (index % LANES)[..., None, None], axis=-2)[..., 0, :]


def blocks_native_applies(x: jax.Array) -> bool:
    """Whether `blocks_matmul` runs natively for float32 rows `x` [M, K]: on one CPU device with the kernels
    built (under tensor parallelism XLA would gather the weight around the custom call)."""
    return (x.ndim == 2 and x.dtype == jnp.float32 and jax.default_backend() == "cpu" and jax.device_count() == 1
            and native_kernels_ready())


def tiles_apply(rows: int) -> bool:
    """Whether a product of `rows` rows runs on AMX tiles by default: the CPU has them, and there are
    TILES_MIN_ROWS rows."""
    return cpu_has_bf16_tiles() and rows >= TILES_MIN_ROWS


def blocks_matmul(x: jax.Array, w: jax.Array, kind: str, tiles: bool | None = None,
                  lanes: bool = False) -> jax.Array:  # f32[M, N]
    """x f32[M, K] times the block weight w u8[N, K / 32 * bytes] transposed, by the native kernel (only where
    `blocks_native_applies`): in the lanes layout (`lanes`) by the lanes form; else on AMX tiles (`tiles`; by
    default where the CPU has them and there are TILES_MIN_ROWS rows) if Linux lends them, or in AVX registers;
    the same float32 products every way."""
    if tiles is None:
        tiles = not lanes and tiles_apply(x.shape[0])
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(f"xlserve_blocks_matmul_{kind}", out, vmap_method="sequential")
    return call(x, w, tiles=tiles, lanes=lanes)


def blocks_decode(w: jax.Array, kind: str) -> jax.Array:  # f32[N, K]
    """The block weight w u8[N, K / 32 * bytes] (the file's layout) decoded whole by the native kernel (only where
    `blocks_native_applies`), as `dequantize_blocks` decodes it."""
    out = jax.ShapeDtypeStruct((w.shape[0], w.shape[1] // BLOCK_BYTES[kind] * BLOCK), jnp.float32)
    return jax.ffi.ffi_call(f"xlserve_blocks_decode_{kind}", out, vmap_method="sequential")(w)


def _half(pair: jax.Array) -> jax.Array:  # u8[..., 2] -> f32[...]
    return jax.lax.bitcast_convert_type(pair, jnp.float16).astype(jnp.float32)


def dequantize_blocks(w: jax.Array, kind: str, lanes: bool = False) -> jax.Array:  # f32[..., K]
    """The block weight w u8[..., K / 32 * bytes] (in the lanes layout if `lanes`) as float32 [..., K], as gguf's
    `dequantize` computes it."""
    if lanes:
        w = from_lanes(w, kind)
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
