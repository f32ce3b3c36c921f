"""Matmul weights as stored and multiplied: quantized (`--weight-quant int8|fp8`) with per-output-channel
scales and matmuls that never build a dequantized copy of a weight, in bfloat16 under float32 activations
on CPU (`--weight-quant bf16`), and every matmul weight on CPU.

A quantizable weight contracts its leading `in_dims` dimensions with the activation's last one and keeps
the rest as output channels (model/loader.py declares `in_dims` for each). Quantized, it is `values` with
the same dimensions moved inputs last ([*out, *in], `stored_shape`: each output channel's inputs
contiguous, the operand layout of Hopper's fp8 GEMM and of Hugging Face's FP8 checkpoints) and an f32
`scale` over the output channels, symmetric: w = values.T * scale (as matrices). int8 values are int8;
fp8 values are float8_e4m3fn, except on CPU, where they are kept as their bytes (uint8) and
reinterpreted where they are used: XLA:CPU, which has no fp8 arithmetic, converts every fp8 array to f16
as a whole on entry, whatever uses it.

Since the scale is per output channel, it multiplies the matmul's *output*: x @ w = (x @ values.T) * scale,
so only the conversion of `values` to the activation dtype is left, and where it runs decides whether a
weight-sized temporary exists (and how fast the product streams the weight):
    reduce   (GPU, one row) no dot at all: the row times each output channel's contiguous inputs, summed
             over them (XLA's row reduction, the convert fused into its loads). On the H100 it streams a
             one-row fp8 or int8 product 1.1-1.3x faster than the fused dot (docs/perf-notes.md, "Ninth
             session"): a GEMM's tiling only wastes work at one row.
    fused    (GPU) the convert is an operand of the dot: XLA:GPU fuses it into its GEMM fusion, so each
             tile of the weight is converted after its load from memory (a split-K Triton GEMM at
             Llama-3.1-8B's shapes on the H100).
    native   (GPU, fp8, a product of at least `NATIVE_FP8_MIN_ROWS` rows) each row of the activations is
             scaled into e4m3's range and the dot runs in fp8 on the tensor cores (cuBLASLt's fp8 GEMM),
             both scales applied to its f32 output: faster than bf16 where the product is compute-bound
             (prefill, large decode batches). Fewer rows stream the weight faster through the fused path.
             Such programs compile without XLA's Triton GEMMs (`compiler_options`).
    blocked  (CPU) XLA:CPU runs a dot's operands as buffers of their own (it would convert the whole weight
             first), so the weight is converted and multiplied a block of output channels at a time in a
             loop, weight-left (see below): the temporary is one block (`BLOCK_ELEMENTS`), never the weight.
             (GPU) An int8 LM head (--lm-head-quant) in a program compiled without XLA's Triton GEMMs (fp8
             layers' native steps, `compiler_options`), where the convert cannot fuse into the dot: blocks of
             `GPU_BLOCK_ELEMENTS`, rows-left (LMHead picks it).
The decode step's memory analysis (tests/test_weight_quant.py) holds the CPU path to that.

On CPU every matmul weight is stored inputs-last (`stored_inputs_last`), quantized or not, and an unquantized
one multiplies as (values @ x.T).T, the weight as the dot's left operand, below `ROWS_LEFT_MIN_ROWS` rows:
XLA:CPU (its YNNPACK dots) ran that orientation ~1.7x faster than x @ w at 4-32 rows (docs/perf-notes.md,
"Seventh session"). From there on (prompt chunks) the rows go left, as YNNPACK takes the weight inputs-last
without a copy, and the output then needs no transpose, which the orientation above costs in the fusion
after it (the MLP's silu over [2F, rows] read across: half the prefill step's non-dot time). Elsewhere
unquantized weights stay inputs-first ([*in, *out]), the layout cuBLAS streams fastest at one row on the H100.

bf16 (CPU) is no quantization: the weight itself in bfloat16, no scales, the embedding and the LM head
included, while activations, norms, attention and the KV cache stay float32. Products of two rows or more
round the rows to bfloat16 and run as bf16 dots accumulating in f32, which XLA:CPU runs on Intel's AMX
tiles where the CPU has them (2.8x the f32 products at 16 rows, docs/perf-notes.md "Twelfth session"); one
row, where XLA's bf16 dot is 6x slower than its f32 one, goes to the native kernel (`xlkernels.cpu_matmul`),
which widens the weight to f32 as it streams it.

GGUF blocks (CPU: `--weight-quant q4_0|q4_1|q8_0`, `BLOCK_FORMATS`) keep each output channel's inputs in
blocks of 32 with their own float16 scale (`xlkernels/cpu_blocks.py`): u8 values whose last input dimension
counts bytes (`values_shape`), no per-channel scales. A GGUF file's own blocks are stored as they are, other
weights are quantized here as the gguf package would (`quantize_blocks`); the products decode them exactly to
the float32 weights they stand for, in registers (`_block_product`). On a CPU with AVX-512 and without AMX the
bytes are stored in the lanes layout (`xlkernels.cpu_blocks.to_lanes`, where `lanes_applies`), which the
kernel multiplies fastest there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from xlkernels.cpu_blocks import (
    BLOCK,
    BLOCK_BYTES,
    blocks_decode,
    blocks_matmul,
    blocks_native_applies,
    dequantize_blocks,
    lanes_applies,
    tiles_apply,
    to_lanes,
)
from xlkernels.cpu_matmul import native_matmul_applies, rows_matmul

T = TypeVar("T")

SCALED_FORMATS = ("int8", "fp8")  # values with per-output-channel scales (bf16, the other format, has none)
BLOCK_FORMATS = tuple(BLOCK_BYTES)  # GGUF's blocks of 32 inputs, each with its own scale (CPU)
_STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}
# Weight elements converted per iteration of the CPU loop: 256 KiB of f32, far below any matrix worth quantizing.
BLOCK_ELEMENTS = 1 << 16
# The GPU's blocks (64 MB of bf16): a few blocks make the loop (16 at Llama-3.1-8B's 128,256-row head), each a
# GEMM of thousands of columns
GPU_BLOCK_ELEMENTS = 1 << 25
# Rows from which an fp8 product runs natively in fp8 (docs/perf-notes.md: on the H100 the fused path is
# faster up to 64 rows, the native dot from 256 and 1.5x bf16 at 2048).
NATIVE_FP8_MIN_ROWS = 128


# The platform the weights and matmuls are built for: JAX's default backend, unless set for the whole process
# by `target_platform` (tests/test_gpu_lowering.py lowers the GPU's step on a CPU; tools/quant_quality.py
# measures the GPU's arithmetic on a CPU, with the engine's threads).
_target_platform: str | None = None


@contextlib.contextmanager
def target_platform(name: str) -> Iterator[None]:
    """Within it, stored dtypes and matmul strategies are those of platform `name` ("cpu", "cuda", ...)."""
    global _target_platform
    previous, _target_platform = _target_platform, name
    try:
        yield
    finally:
        _target_platform = previous


def current_platform() -> str:
    """The platform quantized weights are built for now (see `target_platform`)."""
    return _target_platform or jax.default_backend()


def has_scales(quant: str | None) -> bool:
    """Whether weights stored as `quant` ("int8", "fp8", "bf16" or None) carry per-output-channel scales."""
    return quant in SCALED_FORMATS


def is_block_format(quant: str | None) -> bool:
    """Whether weights stored as `quant` are GGUF blocks (q4_0, q4_1, q8_0)."""
    return quant in BLOCK_FORMATS


def storage_dtype(kind: str) -> jnp.dtype:
    """The dtype a weight format's values are stored in on this backend (see the module docstring for fp8 on
    CPU)."""
    if is_block_format(kind):
        return jnp.dtype(jnp.uint8)
    if kind == "bf16":
        return jnp.dtype(jnp.bfloat16)
    if kind == "fp8" and current_platform() == "cpu":
        return jnp.dtype(jnp.uint8)
    return jnp.dtype(_STORAGE[kind])


def stored_inputs_last(quant: str | None) -> bool:
    """Whether a matmul weight (quantized as `quant`, or not: None) is stored inputs-last on this platform."""
    return quant is not None or current_platform() == "cpu"


def stored_shape(dims: tuple[T, ...], in_dims: int) -> tuple[T, ...]:
    """The values' dimensions (sizes, or logical axes) for a weight's `dims` whose leading `in_dims` are its
    inputs: the inputs last."""
    return (*dims[in_dims:], *dims[:in_dims])


def values_shape(dims: tuple[int, ...], in_dims: int, quant: str | None) -> tuple[int, ...]:
    """The stored values' shape of an inputs-last matmul weight of declared `dims` (`stored_shape`), in bytes
    for a GGUF block format (`block_bytes_shape`)."""
    shape = stored_shape(dims, in_dims)
    return block_bytes_shape(shape, quant) if is_block_format(quant) else shape


def block_bytes_shape(dims: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """A block weight's bytes for values of `dims` (inputs last): the last input dimension in bytes, each
    output channel's inputs being whole blocks in order."""
    if dims[-1] % BLOCK:
        raise ValueError(f"GGUF blocks hold {BLOCK} inputs; an input dimension of {dims[-1]} is not whole blocks")
    return (*dims[:-1], dims[-1] // BLOCK * BLOCK_BYTES[kind])


@dataclass(frozen=True)
class InputsLastWeight:
    """A matmul weight stored inputs-last: quantized (with its scales), or unquantized on CPU (no scales)."""

    values: jax.Array  # [*out, *in] (`stored_shape`): int8, float8_e4m3fn (its bytes on CPU), the model's dtype,
    # or u8 GGUF blocks (`block_bytes_shape`: the last input dimension in bytes)
    scale: jax.Array | None  # f32[*out], one per output channel; None: `values` are the weight itself, or blocks
    in_dims: int = 1  # static: trailing dimensions of `values` contracted by the matmul
    blocks: str | None = None  # static: the block format of `values` (BLOCK_FORMATS), or None
    lanes: bool = False  # static: blocks stored in the lanes layout (`xlkernels.cpu_blocks.to_lanes`)


jax.tree_util.register_dataclass(InputsLastWeight, data_fields=["values", "scale"],
                                 meta_fields=["in_dims", "blocks", "lanes"])

Weight = jax.Array | InputsLastWeight


def inputs_last(w: jax.Array, in_dims: int) -> jax.Array:
    """`w` [*in, *out], whose leading `in_dims` dimensions are its inputs, as [*out, *in]."""
    return jnp.transpose(w, (*range(in_dims, w.ndim), *range(in_dims)))


def quantize_weight(w: jax.Array, kind: str, in_dims: int) -> tuple[jax.Array, jax.Array]:
    """(values [*out, *in], f32 scale per output channel) of `w` [*in, *out], whose leading `in_dims`
    dimensions are its inputs."""
    w = inputs_last(w.astype(jnp.float32), in_dims)
    scale = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - in_dims, w.ndim))) / _QMAX[kind]
    scaled = jnp.clip(w / jnp.where(scale > 0, scale, 1.0)[(...,) + (None,) * in_dims], -_QMAX[kind], _QMAX[kind])
    if kind == "int8":
        return jnp.round(scaled).astype(jnp.int8), scale
    values = scaled.astype(jnp.float8_e4m3fn)
    if storage_dtype(kind) == jnp.uint8:
        values = jax.lax.bitcast_convert_type(values, jnp.uint8)
    return values, scale


def quantize_blocks(w: jax.Array, kind: str) -> jax.Array:  # u8[..., K / 32 * bytes]
    """w [..., K] (inputs last) as GGUF blocks of `kind`, rounded as the gguf package's `quantize` rounds."""
    blocks = w.astype(jnp.float32).reshape(*w.shape[:-1], -1, BLOCK)  # [..., K / 32, 32]

    def half_bytes(v: jax.Array) -> jax.Array:  # f32[..., 1] -> u8[..., 2]
        return jax.lax.bitcast_convert_type(v.astype(jnp.float16), jnp.uint8).reshape(*v.shape[:-1], 2)

    def nibbles(codes: jax.Array) -> jax.Array:  # u8[..., 32] -> u8[..., 16]: element j low, j + 16 high
        return codes[..., :16] | (codes[..., 16:] << 4)

    if kind == "q8_0":
        d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / 127
        inverse = jnp.where(d == 0, 0.0, 1 / d)
        scaled = jnp.abs(blocks * inverse)  # rounded half away from zero, as ggml rounds
        whole = jnp.floor(scaled)
        rounded = jnp.sign(blocks) * (whole + jnp.floor(2 * (scaled - whole)))
        codes = jax.lax.bitcast_convert_type(rounded.astype(jnp.int8), jnp.uint8)
        out = [half_bytes(d), codes]
    elif kind == "q4_0":  # the signed extreme maps to -8
        extreme = jnp.take_along_axis(blocks, jnp.argmax(jnp.abs(blocks), axis=-1, keepdims=True), axis=-1)
        d = extreme / -8
        inverse = jnp.where(d == 0, 0.0, 1 / d)
        codes = jnp.clip(jnp.trunc(blocks * inverse + 8.5), 0, 15).astype(jnp.uint8)
        out = [half_bytes(d), nibbles(codes)]
    else:  # q4_1
        low, high = jnp.min(blocks, axis=-1, keepdims=True), jnp.max(blocks, axis=-1, keepdims=True)
        d = (high - low) / 15
        inverse = jnp.where(d == 0, 0.0, 1 / d)
        codes = jnp.clip(jnp.trunc((blocks - low) * inverse + 0.5), 0, 15).astype(jnp.uint8)
        out = [half_bytes(d), half_bytes(low), nibbles(codes)]
    return jnp.concatenate(out, axis=-1).reshape(*w.shape[:-1], -1)


def stored_weight(w: jax.Array, dtype: np.dtype, quant: str | None, in_dims: int) -> tuple[jax.Array, ...]:
    """The arrays a parameter `w` (its declared shape; `in_dims` > 0 for a matmul weight) is stored as:
    itself in `dtype` (in bfloat16 for the bf16 format), inputs-last where `stored_inputs_last` says so,
    quantized values and scales, or GGUF blocks: `w` is then either already blocks (u8, a GGUF file's own,
    its last input dimension in bytes) or floats quantized here."""
    if is_block_format(quant):
        w = inputs_last(w, in_dims)
        if w.dtype != jnp.uint8:
            stored = block_bytes_shape(w.shape, quant)
            w = quantize_blocks(w.reshape(*w.shape[: w.ndim - in_dims], -1), quant).reshape(stored)
        return (to_lanes(w, quant) if lanes_applies(w.shape) else w,)
    if has_scales(quant):
        return quantize_weight(w, quant, in_dims)
    if quant is not None:
        dtype = storage_dtype(quant)
    if in_dims and stored_inputs_last(quant):
        w = inputs_last(w, in_dims)
    return (w.astype(dtype),)


def decode(values: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Stored values (int8, e4m3, or e4m3's bytes) as `dtype`: exact, every format fits bf16's significand."""
    if values.dtype == jnp.uint8:
        values = jax.lax.bitcast_convert_type(values, jnp.float8_e4m3fn)
    return values.astype(dtype)


def matmul_strategy(rows: int, values_dtype: jnp.dtype, backend: str | None = None) -> str:
    """How `linear` multiplies `rows` activation rows by quantized values of `values_dtype` on `backend`
    (default: JAX's): "blocked" on CPU; elsewhere "reduce" for one row, "native" for fp8 from
    NATIVE_FP8_MIN_ROWS rows, "fused" otherwise (see the module docstring)."""
    if (backend or current_platform()) == "cpu":
        return "blocked"
    if rows == 1:
        return "reduce"
    return "native" if values_dtype == jnp.float8_e4m3fn and rows >= NATIVE_FP8_MIN_ROWS else "fused"


def compiler_options(rows: int, weight_quant: str | None, backend: str | None = None) -> dict[str, bool]:
    """XLA options for a program whose matmuls have `rows` rows over weights quantized as `weight_quant` (a
    model config's: "int8", "fp8" or None): where its products run natively in fp8, without XLA's Triton
    GEMMs, so that cuBLASLt's fp8 GEMM runs them. As Triton GEMMs XLA:GPU autotunes them for minutes (a B3
    bucket set did not compile in 230 s on the H100), and untuned they ran 20x slower than cuBLASLt
    (docs/perf-notes.md, "Ninth session")."""
    if not has_scales(weight_quant) or matmul_strategy(rows, jnp.dtype(_STORAGE[weight_quant]), backend) != "native":
        return {}
    return {"xla_gpu_enable_triton_gemm": False}


class Scaled(NamedTuple):
    """A scaled weight's one-row product before its scale (`linear(..., keep_scale=True)`), for a consumer that
    multiplies and rounds it inside its own kernel (the rope and cache-write kernel, the add + RMSNorm kernel)."""

    total: jax.Array  # f32[..., *out] the reduction's sums
    scale: jax.Array  # f32[*out] the weight's scale

    def rounded(self, dtype: jnp.dtype) -> jax.Array:  # [..., *out]: what `linear` would have returned
        return (self.total * self.scale).astype(dtype)


def linear(x: jax.Array, w: Weight, in_dims: int = 1, strategy: str | None = None, keep_scale: bool = False,
           out_dtype: jnp.dtype | None = None) -> jax.Array | Scaled:
    """x [..., K] times w [*in, *out] with K = prod(in) (the leading `in_dims` dims; an `InputsLastWeight`'s
    values are stored [*out, *in]): [..., *out] in `out_dtype`, by default x.dtype (f32 accumulation for a
    quantized weight; a scaled weight's product rounded once, to `out_dtype`).

    keep_scale: a scaled weight's one-row product ("reduce") comes back as a `Scaled`, for a consumer that
    applies the scale and rounds inside its own kernel: XLA runs that multiply and cast after the reduction as
    a kernel of its own, and multiplying inside the sum instead slowed the reductions as much (docs/perf-notes.md,
    "Twenty-third session"). Every other product comes back as an array in `out_dtype`.
    """
    if not isinstance(w, InputsLastWeight):
        out_shape = w.shape[in_dims:]
        if in_dims == 1:
            return jnp.tensordot(x, w, axes=1)
        # As one [K, N] matrix (a free reshape): contracting several dims let XLA:CPU copy the weight's layout.
        return (x @ w.reshape(math.prod(w.shape[:in_dims]), -1)).reshape(*x.shape[:-1], *out_shape)
    out_shape = w.values.shape[: w.values.ndim - in_dims]
    # [*out, K]: only the input dims are merged. Merging the output dims too would cost nothing on one
    # device, but under tensor parallelism [2, F] with F split (w_gate_up) is no contiguous split of 2F,
    # and GSPMD would gather the whole weight onto every device (tests/test_tensor_parallel.py).
    values = w.values.reshape(*out_shape, -1)
    rows = x.reshape(-1, x.shape[-1])
    if w.blocks is not None:
        return _block_product(rows, values.reshape(-1, values.shape[-1]), w.blocks, w.lanes).astype(x.dtype).reshape(
            *x.shape[:-1], *out_shape)
    if w.scale is None:  # unquantized or bf16, on CPU
        return _transposed(rows, values).astype(x.dtype).reshape(*x.shape[:-1], *out_shape)
    strategy = strategy or matmul_strategy(rows.shape[0], values.dtype)
    if strategy == "native":
        y = _native_fp8(rows, values) * w.scale
    elif strategy == "reduce":
        if keep_scale:
            return Scaled(_reduced(rows, values).reshape(*x.shape[:-1], *out_shape), w.scale)
        y = _reduced(rows, values) * w.scale
    elif strategy == "fused":
        y = _contract(rows, decode(values, x.dtype)) * w.scale
    else:  # one device in practice (its loop slices the output channels, which GSPMD would gather)
        y = _blocked(rows, values.reshape(-1, values.shape[-1]), w.scale.reshape(-1),
                     rows_left=current_platform() != "cpu").reshape(-1, *out_shape)
    return y.astype(out_dtype or x.dtype).reshape(*x.shape[:-1], *out_shape)


def _contract(rows: jax.Array, values: jax.Array) -> jax.Array:  # f32[M, *out]
    """rows [M, K] with values [*out, K], accumulated in f32."""
    return jax.lax.dot_general(rows, values, (((1,), (values.ndim - 1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _reduced(rows: jax.Array, values: jax.Array) -> jax.Array:  # f32[M, *out]
    """rows [M, K] with values [*out, K] as f32 products summed over K: no dot, for one row."""
    per_channel = rows.astype(jnp.float32).reshape(rows.shape[0], *(1,) * (values.ndim - 1), rows.shape[1])
    return jnp.sum(per_channel * decode(values, jnp.float32)[None], axis=-1)


# The fewest rows the native kernel (xlkernels/cpu_matmul.cc) takes: from 9 rows it fills its 16-lane
# vectors and beat XLA's dot at SmolLM2-135M's shapes (docs/perf-notes.md, "Tenth session"); at 8 rows
# and fewer it was no faster, at 1-4 up to 2x slower.
NATIVE_MIN_ROWS = 9


# Rows from which an unquantized CPU product puts the rows left (x @ values.T, no transpose after): at 256
# rows 1.2-2.7x faster than weight-left at SmolLM2's shapes, even from 64 (docs/perf-notes.md, "Fifteenth
# session").
ROWS_LEFT_MIN_ROWS = 64


def _transposed(rows: jax.Array, values: jax.Array) -> jax.Array:  # f32[M, *out]
    """rows [M, K] with values [*out, K] (float32, or bfloat16: the rows are rounded to it) as
    (values @ rows.T).T below ROWS_LEFT_MIN_ROWS rows, or by the native kernel on one CPU device: float32
    products of NATIVE_MIN_ROWS..16 rows, bfloat16 products of one; rows @ values.T from ROWS_LEFT_MIN_ROWS
    on one device (under tensor parallelism `flat` would gather a weight whose output dims are split).
    The barrier keeps XLA's simplifier from folding the transpose back into the dot, which would restore the
    x @ w orientation."""
    bf16 = values.dtype == jnp.bfloat16
    flat = values.reshape(-1, values.shape[-1])  # [N, K]: free on one device, the only place the kernel runs
    if (bf16 or rows.shape[0] >= NATIVE_MIN_ROWS) and native_matmul_applies(rows, flat):  # bf16: one row
        return rows_matmul(rows, flat).reshape(rows.shape[0], *values.shape[:-1])
    if bf16 and rows.shape[0] == 1:  # no kernel: XLA's bf16 dot of one row is slower than this reduction
        return _reduced(rows, values)
    if bf16:
        rows = rows.astype(jnp.bfloat16)
    if rows.shape[0] >= ROWS_LEFT_MIN_ROWS and jax.device_count() == 1:
        # As one [N, K] matrix: with several output dims XLA:CPU copied the weight into [K, N] for each call.
        return _contract(rows, flat).reshape(rows.shape[0], *values.shape[:-1])
    y = jax.lax.dot_general(values, rows, (((values.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.moveaxis(jax.lax.optimization_barrier(y), -1, 0)


# Rows from which a product over GGUF blocks in the file's layout decodes the weight whole for XLA's dot, on a
# CPU without AMX tiles: SmolLM2-135M's layers (Q4_1) at 64 / 128 / 256 / 512 rows took 4.5 / 10.0 / 18.1 / 38.3
# ms through the dot form, 6.4 / 11.3 / 16.1 / 24.8 decoded first. The tile form beats decoding at every row
# count, and so does the lanes form at the CPU preset's prompt chunks (256 rows: a prefill turn 437-473 -> 337-346
# ms, docs/perf-notes.md "Twenty-first session").
BLOCKS_DECODE_MIN_ROWS = 256


def _block_product(rows: jax.Array, values: jax.Array, kind: str, lanes: bool) -> jax.Array:  # f32[M, N]
    """rows [M, K] with the block weight values u8[N, K / 32 * bytes] (in the lanes layout if `lanes`),
    natively: by the product kernel, which decodes each block in registers (on AMX tiles from TILES_MIN_ROWS
    rows where the CPU has them; by the lanes form in the lanes layout); with neither, from
    BLOCKS_DECODE_MIN_ROWS rows (long prompt chunks) the weight is decoded whole into a float32 temporary and
    multiplied rows-left by XLA's dot, as float32 weights are. Where the kernels cannot run, XLA decodes the
    blocks (XLA:CPU decoded SmolLM2-135M's layers at ~1 ns a weight)."""
    rows = rows.astype(jnp.float32)
    if not blocks_native_applies(rows):
        return _contract(rows, dequantize_blocks(values, kind, lanes))
    if lanes or rows.shape[0] < BLOCKS_DECODE_MIN_ROWS or tiles_apply(rows.shape[0]):
        return blocks_matmul(rows, values, kind, lanes=lanes)
    return _contract(rows, blocks_decode(values, kind))


def _native_fp8(rows: jax.Array, values: jax.Array) -> jax.Array:  # f32[M, *out], before the weight's scale
    """rows [M, K] scaled per row into e4m3 and multiplied by the e4m3 values [*out, K] in fp8."""
    rows = rows.astype(jnp.float32)
    row_scale = jnp.max(jnp.abs(rows), axis=1, keepdims=True) / _QMAX["fp8"]
    row_scale = jnp.where(row_scale > 0, row_scale, 1.0)
    y = _contract((rows / row_scale).astype(jnp.float8_e4m3fn), decode(values, jnp.float8_e4m3fn))
    return y * row_scale.reshape(-1, *(1,) * (values.ndim - 1))


def _blocked(x: jax.Array, values: jax.Array, scale: jax.Array, rows_left: bool = False) -> jax.Array:  # f32[M, N]
    """(x @ values.T) * scale for values [N, K], converting `values` one block of output channels per loop
    iteration. On CPU each block is multiplied weight-left (as `_transposed`) into rows of the transposed output;
    `rows_left` (GPU) multiplies x @ block.T into columns of the output instead, in blocks of GPU_BLOCK_ELEMENTS."""
    n, k = values.shape
    block = column_block(n, k, GPU_BLOCK_ELEMENTS if rows_left else BLOCK_ELEMENTS)
    axis = 1 if rows_left else 0

    def body(i: jax.Array, out: jax.Array) -> jax.Array:  # out f32[M, N] (rows_left) or f32[N, M]
        block_values = decode(jax.lax.dynamic_slice_in_dim(values, i * block, block), x.dtype)  # [block, K]
        block_scale = jax.lax.dynamic_slice_in_dim(scale, i * block, block)
        contract = (((1,), (1,)), ((), ()))
        if rows_left:  # [M, block]
            part = jax.lax.dot_general(x, block_values, contract, preferred_element_type=jnp.float32) * block_scale
        else:  # [block, M]
            part = jax.lax.dot_general(block_values, x, contract, preferred_element_type=jnp.float32)
            part = part * block_scale[:, None]
        return jax.lax.dynamic_update_slice_in_dim(out, part, i * block, axis=axis)

    out = jax.lax.fori_loop(0, n // block, body, jnp.zeros((x.shape[0], n) if rows_left else (n, x.shape[0]),
                                                           jnp.float32))
    return out if rows_left else out.T


def column_block(n: int, k: int, elements: int = BLOCK_ELEMENTS) -> int:
    """The widest divisor of n whose [block, k] slice holds at most `elements` elements (at least 1)."""
    widest = max(1, min(n, elements // max(k, 1)))
    return next(b for b in range(widest, 0, -1) if n % b == 0)
