"""Quantized KV pages (`--quant-policy`, LMDeploy's flag): int8, int4 (two per byte) or fp8 (e4m3) values
with one scale per token and KV head.

A page pool is either a plain array `[Hkv, P, PS, D]` (policy 0: the serving dtype) or `QuantizedPages`:
    data   [Hkv, P, PS / halves, D]  int8 (int8, and int4 packed two per byte) or float8_e4m3fn
    scale  [Hkv, halves, P, PS / halves]  bfloat16, one per (KV head, token): x = data * scale
`halves` is 2 for int4 and 1 otherwise. int4 packs two *tokens* per byte, not two channels: byte (t, d) of
a page holds token t in its low nibble and token t + PS/2 in its high one. A kernel then unpacks a block
of pages into two half-blocks of whole tokens, each a dot of its own with the unsplit query, so neither
the query nor the output is ever sliced along head_dim (which Triton handles badly), and the scales of
each half are one contiguous row (`scale[half]`). Writing a token changes one nibble of a byte it shares
with another token of the page, so the cache write is a read-modify-write, in two passes (low nibbles,
then high ones) so that two tokens of one step never write the same byte in one scatter.

Why symmetric and per token: a token is written once and never rescaled, so its scale can be fixed when
it is written, from its own values (no calibration, no clipping of later tokens). Per-page fp8 scales
(tpu-inference's scalar scales, TRT-LLM's per-tensor ones) would have to be fixed by the page's first
token, and a later, larger token would clip; per-tensor scales are the ones users report losing accuracy
with (TRT-LLM #2309). The scale is rounded to bfloat16 *before* the values are divided by it, so storing
it in 2 bytes adds no error. Its cost: 2 bytes per token and head, so an int8 page holds D + 2 bytes per
token and head instead of 2D (bf16): 1.94x the pages at D = 64, 1.97x at D = 128; int4 3.8x and 3.9x.

Outlier channels: a few channels of a head's keys are often an order of magnitude larger than the rest
(RoPE's low frequencies), and a per-token scale set by them leaves the other channels a handful of steps.
Before a quantized write, keys and values are multiplied by an orthonormal Hadamard matrix H (`rotation`),
which spreads every channel's energy over all of them; the query is multiplied by the same H, and the
attention output by H again (H is symmetric and its own inverse), so q.k and p.v are unchanged and only
the rounding sees the flattened channels (QuaRot's incoherence processing, applied to the cache alone).
On SmolLM2-135M it takes int4's perplexity cost from +48% to +11% and int8's KL from 6.2e-4 to 1.6e-4
(docs/benchmarks.md, "Quantization quality"). Head sizes that are not a power of two are left unrotated.

Kernels keep the scales out of the inner products: q.k = scale_k * (q . k_q) and
p.v = (p * scale_v) . v_q, so each key or value is converted once, in registers, right after its load.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlkernels import KV_FORMATS

SCALE_DTYPE = jnp.bfloat16
# Largest magnitude each format stores: int4 keeps -8 unused, so the grid is symmetric.
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}
_STORAGE = {"int8": jnp.int8, "int4": jnp.int8, "fp8": jnp.float8_e4m3fn}


def kv_format(policy: str | int) -> str | None:
    """The page format (`int8`, `int4`, `fp8`, or None for the serving dtype) of a --quant-policy value."""
    key = str(policy)
    if key not in KV_FORMATS:
        raise ValueError(f"quant_policy must be one of {', '.join(KV_FORMATS)}, got {policy!r}")
    return KV_FORMATS[key]


def halves_of(kind: str) -> int:
    """Tokens per stored element: 2 for int4, 1 otherwise."""
    return 2 if kind == "int4" else 1


@dataclass(frozen=True)
class QuantizedPages:
    """One layer's K (or V) page pool in a quantized format (see the module docstring for the layout)."""

    data: jax.Array  # [Hkv, P, PS // halves, D]
    scale: jax.Array  # [Hkv, halves, P, PS // halves] bfloat16
    kind: str = "int8"  # static: int8 | int4 | fp8

    @property
    def halves(self) -> int:
        return halves_of(self.kind)

    @property
    def page_size(self) -> int:
        return self.data.shape[2] * self.halves

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical [Hkv, P, PS, D] shape, as a plain pool's."""
        num_kv_heads, num_pages, _, head_dim = self.data.shape
        return num_kv_heads, num_pages, self.page_size, head_dim


jax.tree_util.register_dataclass(QuantizedPages, data_fields=["data", "scale"], meta_fields=["kind"])

Pages = jax.Array | QuantizedPages


def token_head_bytes(kind: str | None, head_dim: int, dtype: jnp.dtype) -> int:
    """Bytes one token's K (or V) takes per KV head in a pool of this format (scale included)."""
    if kind is None:
        return head_dim * np.dtype(dtype).itemsize
    values = head_dim // halves_of(kind) * np.dtype(_STORAGE[kind]).itemsize
    return values + np.dtype(SCALE_DTYPE).itemsize


# XLA:CPU gathers and scatters bfloat16 through float32, widening the whole operand (a layer's pool, every
# step: ~12 ms a layer for SmolLM2's pool of 18k tokens), and a bitcast of a pool is a copy there too. So the
# CPU's bfloat16 pools are stored as their 16-bit patterns (`serving.engine.engine.kv_page_dtype` picks this
# element type), and only the tokens written or gathered are reinterpreted (`as_stored`, `as_values`); the
# native decode kernel reads the patterns as bfloat16.
BF16_BITS = jnp.dtype(jnp.uint16)


def as_stored(x: jax.Array, stored: jnp.dtype) -> jax.Array:
    """Values `x` in a plain pool's element type `stored` (bfloat16 bits: rounded to bfloat16, then reinterpreted)."""
    if stored == BF16_BITS:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
    return x.astype(stored)


def as_values(x: jax.Array) -> jax.Array:
    """Elements gathered from a plain pool as numbers (bfloat16 bits as bfloat16, others as they are)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BF16_BITS else x


def empty_pages(kind: str | None, shape: tuple[int, int, int, int], dtype: jnp.dtype) -> Pages:
    """A zeroed pool of logical shape [Hkv, P, PS, D] (call under jit to create it on the device)."""
    if kind is None:
        return jnp.zeros(shape, dtype)
    num_kv_heads, num_pages, page_size, head_dim = shape
    halves = halves_of(kind)
    if page_size % halves:
        raise ValueError(f"int4 pages need an even page size, got {page_size}")
    return QuantizedPages(jnp.zeros((num_kv_heads, num_pages, page_size // halves, head_dim), _STORAGE[kind]),
                          jnp.zeros((num_kv_heads, halves, num_pages, page_size // halves), SCALE_DTYPE), kind)


def quantize(x: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (values [..., D] in the storage dtype, int4 unpacked; scale [...] bfloat16), symmetric."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = (amax / _QMAX[kind]).astype(SCALE_DTYPE)  # rounded first: dividing by the stored scale loses nothing
    divisor = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)[..., None]
    scaled = jnp.clip(x / divisor, -_QMAX[kind], _QMAX[kind])
    if kind == "fp8":
        return scaled.astype(jnp.float8_e4m3fn), scale
    return jnp.round(scaled).astype(jnp.int8), scale


def unpack_int4(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Bytes -> (low nibbles, high nibbles) as int8 in [-8, 7]: the page's first and second half of tokens."""
    return jnp.right_shift(jnp.left_shift(packed, 4), 4), jnp.right_shift(packed, 4)


def dequantize(pages: QuantizedPages) -> jax.Array:
    """The pool as f32 [Hkv, P, PS, D] (the reference path; kernels never build this)."""
    num_kv_heads, num_pages, page_size, head_dim = pages.shape
    if pages.kind == "int4":
        values = jnp.stack(unpack_int4(pages.data), axis=2)  # [Hkv, P, 2, PS/2, D]
    else:
        values = pages.data[:, :, None]
    scale = pages.scale.transpose(0, 2, 1, 3)[..., None]  # [Hkv, P, halves, PS/halves, 1]
    return (values.astype(jnp.float32) * scale.astype(jnp.float32)).reshape(num_kv_heads, num_pages, page_size,
                                                                            head_dim)


def write_tokens(pages: Pages, new: jax.Array, page_idx: jax.Array, offsets: jax.Array) -> Pages:
    """Store new [Hkv, N, D] at (page_idx[n], offsets[n]); page indices past the pool drop."""
    if not isinstance(pages, QuantizedPages):
        return pages.at[:, page_idx, offsets].set(as_stored(new, pages.dtype), mode="drop")
    values, scale = quantize(new, pages.kind)  # [Hkv, N, D], [Hkv, N]
    if pages.kind != "int4":
        return QuantizedPages(pages.data.at[:, page_idx, offsets].set(values, mode="drop"),
                              pages.scale.at[:, 0, page_idx, offsets].set(scale, mode="drop"), pages.kind)
    half_size = pages.data.shape[2]
    half, row = offsets // half_size, offsets % half_size
    data, num_pages = pages.data, pages.data.shape[1]
    for h, keep, nibble in ((0, jnp.int8(-16), values & jnp.int8(15)), (1, jnp.int8(15), jnp.left_shift(values, 4))):
        target = jnp.where(half == h, page_idx, num_pages)  # the other half's tokens drop in this pass
        old = data.at[:, target, row].get(mode="fill", fill_value=0)
        data = data.at[:, target, row].set((old & keep) | nibble, mode="drop")
    return QuantizedPages(data, pages.scale.at[:, half, page_idx, row].set(scale, mode="drop"), pages.kind)


def rotation(head_dim: int) -> np.ndarray | None:
    """The orthonormal, symmetric Hadamard matrix f32[D, D] (Sylvester's construction) that quantized pages
    are written through, or None when D is not a power of two."""
    if head_dim < 2 or head_dim & (head_dim - 1):
        return None
    matrix = np.ones((1, 1), np.float32)
    while matrix.shape[0] < head_dim:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix / np.sqrt(head_dim, dtype=np.float32)


def as_float(pages: Pages) -> jax.Array:
    """A pool as plain values: itself, or dequantized (references and tests)."""
    return dequantize(pages) if isinstance(pages, QuantizedPages) else pages


def quantize_pages(pages: jax.Array, kind: str | None) -> Pages:
    """A plain [Hkv, P, PS, D] pool stored in `kind` (tests and benchmarks build quantized pools this way)."""
    if kind is None:
        return pages
    num_kv_heads, num_pages, page_size, head_dim = pages.shape
    flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    page_idx = jnp.repeat(jnp.arange(num_pages), page_size)
    offsets = jnp.tile(jnp.arange(page_size), num_pages)
    return write_tokens(empty_pages(kind, pages.shape, pages.dtype), flat, page_idx, offsets)
