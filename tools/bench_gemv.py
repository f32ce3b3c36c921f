"""Time few-row matmuls over quantized weights at Llama-3.1-8B shapes on the GPU (issue 21's B1).

    PYTHONUNBUFFERED=1 python -m tools.bench_gemv [--rows 1,4,16] [--sweep] [--no-pallas] [--hot] [--hlo DIR] [--quick]

For each weight (wqkv, wo, w_gate_up, w_down: [K, N] in bf16, [N, K] quantized as the engine stores them)
and each row count: bf16 weights through XLA's dot, int8 and fp8 weights through XLA's fused convert + dot
(`model.weight_quant`'s "fused"; fp8 also over a [K, N] copy, the layout before), fp8 through Hopper's native
fp8 dot ("native": activations scaled to e4m3 per row), up to 4 rows every format as an XLA reduction without
a dot (`model.weight_quant`'s "reduce", the engine's one-row path; at one row also fp8 two candidate forms of it,
below), and with Pallas our candidate kernels (below, over
[K, N] copies) with their default blocks, or every block choice with --sweep. Each result is checked against an f32
reference first. Prints time per call and the weight bytes streamed per second against the device's
copy bandwidth.

The Pallas kernels here are candidates, not the engine's: measured on the H100 (docs/perf-notes.md) they
are no faster at one row than XLA's own Triton GEMM fusion of the convert and the dot, which is what the
engine runs. `_gemv_kernel` pads the rows to 16 (Triton's smallest dot) and converts [block_k, block_n]
tiles after their load; `_row_kernel` serves one row with products summed in f32, without a dot (it also
reads bf16 weights: whether a GEMV of ours streams them as XLA's GEMM does). Both split K over `k_splits`
programs whose scaled partial sums XLA adds.

The one-row candidates of issue 21's B1 (docs/perf-notes.md, "Twenty-sixth session": XLA's one-row
reductions over fp8 are bound by their work per byte, not by HBM): "reduce parts=P" sums each channel as P
partial sums over K / P inputs apiece, more and shorter rows for the reduction emitter (the engine would hand
the partial sums to the next add + RMSNorm kernel; here a small kernel adds them, one kernel more than the
engine would run); "words reduce" reads the e4m3 values as u32 words and decodes two bytes at a time by moving
their bits into two float16s (`e4m3_pairs_over_256`) instead of XLA's convert of each byte.

Method: each timed executable applies the matmul to `copies` distinct weights (together over ~3x the
50 MB L2, so weights come from HBM) and sums the outputs; the per-call time is the total over copies,
launch gaps included, as in a decode step; --hot reads one copy again instead (a weight under 50 MB stays in L2),
which says how much of a product's time is HBM's. --hlo writes XLA's optimized HLO of the fused one-row path.
--quick runs tiny shapes in interpret mode on CPU to test this script itself.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from model.weight_quant import InputsLastWeight, decode, linear, quantize_weight
from tools.timing import copy_bandwidth, format_bandwidth, timed

ROWS = 16  # Triton's smallest dot; the most rows this kernel serves


def _gemv_kernel(x_ref, w_ref, scale_ref, out_ref, *, block_k: int, steps: int):
    # x_ref [ROWS, K]; w_ref [K, block_n] int8 or e4m3; scale_ref f32[block_n]; out_ref f32[ROWS, block_n]
    first = pl.program_id(1) * steps

    def accumulate(i: jax.Array, acc: jax.Array) -> jax.Array:
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]
        w = w_ref[pl.ds(k0, block_k), :].astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, accumulate, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc * scale_ref[...][None, :]


def _row_kernel(x_ref, w_ref, scale_ref, out_ref, *, block_k: int, steps: int):
    # One row without a dot: x_ref [1, K]; out_ref f32[1, block_n]; products summed over K in f32.
    first = pl.program_id(1) * steps

    def accumulate(i: jax.Array, acc: jax.Array) -> jax.Array:
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        x = x_ref[0, pl.ds(k0, block_k)].astype(jnp.float32)
        w = w_ref[pl.ds(k0, block_k), :].astype(jnp.float32)
        return acc + jnp.sum(x[:, None] * w, axis=0)

    acc = jax.lax.fori_loop(0, steps, accumulate, jnp.zeros(out_ref.shape[1:], jnp.float32))
    out_ref[0, :] = acc * scale_ref[...]


def supports(rows: int, k: int, n: int, block_n: int, block_k: int, k_splits: int) -> bool:
    """Whether the kernel covers x [rows, k] @ values [k, n] with these blocks."""
    return rows <= ROWS and n % block_n == 0 and k % (block_k * k_splits) == 0


def gemv_blocks(k: int, n: int, programs: int = 256) -> dict[str, int] | None:
    """Default blocks for values [k, n]: 64 output channels a program, K split until about `programs`
    programs run (an H100 has 132 SMs; w_down's 4096 channels alone make only 64). None: no block fits."""
    block_n, block_k = 64, 256
    if n % block_n or k % block_k:
        return None
    k_splits = 1
    while (n // block_n) * k_splits < programs and k % (block_k * k_splits * 2) == 0:
        k_splits *= 2
    return dict(block_n=block_n, block_k=block_k, k_splits=k_splits)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "k_splits", "num_warps", "num_stages", "interpret",
                                             "one_row"))
def quantized_gemv(
    x: jax.Array,  # [M, K] activations (bf16 on the GPU), M <= ROWS
    values: jax.Array,  # [K, N] int8 or float8_e4m3fn (or bf16 with a unit scale: the row kernel's bf16 probe)
    scale: jax.Array,  # f32[N] one per output channel
    *,
    block_n: int = 64,
    block_k: int = 256,
    k_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
    one_row: bool = False,
) -> jax.Array:  # f32[M, N]
    (m, k), n = x.shape, values.shape[1]
    assert supports(m, k, n, block_n, block_k, k_splits), (x.shape, values.shape, block_n, block_k, k_splits)
    rows = 1 if one_row else ROWS
    padded = x if one_row else jnp.pad(x, ((0, ROWS - m), (0, 0)))
    partials = pl.pallas_call(
        functools.partial(_row_kernel if one_row else _gemv_kernel, block_k=block_k, steps=k // (block_k * k_splits)),
        out_shape=jax.ShapeDtypeStruct((k_splits, rows, n), jnp.float32),
        grid=(n // block_n, k_splits),
        in_specs=[
            pl.BlockSpec((rows, k), lambda j, s: (0, 0)),
            pl.BlockSpec((k, block_n), lambda j, s: (0, j)),
            pl.BlockSpec((block_n,), lambda j, s: (j,)),
        ],
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="xlserve_quantized_gemv",
    )(padded, values, scale.astype(jnp.float32))
    return partials.sum(axis=0)[:m]


LLAMA3_8B = {"wqkv": (4096, 6144), "wo": (4096, 4096), "w_gate_up": (4096, 28672), "w_down": (14336, 4096)}
QUICK = {"w_small": (512, 256)}
L2_BYTES = 50e6


def quantize(w: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:  # (values [N, K], f32 scale [N])
    """The engine's quantization (`model.weight_quant`), fp8 as e4m3 on CPU too: the kernels read it."""
    values, scale = quantize_weight(w, kind, in_dims=1)
    if values.dtype == jnp.uint8:  # e4m3's bytes, the CPU's storage (quick mode only)
        values = jax.lax.bitcast_convert_type(values, jnp.float8_e4m3fn)
    return values, scale


def native_fp8(x: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:
    """The engine's native fp8 dot (`model.weight_quant`'s "native"): rows scaled into e4m3, both operands fp8."""
    return linear(x, InputsLastWeight(values, scale), strategy="native")


def fused(x: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:
    """The engine's convert inside the dot (`model.weight_quant`'s "fused")."""
    return linear(x, InputsLastWeight(values, scale), strategy="fused")


def reduced(x: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:
    """The engine's one-row product without a dot (`model.weight_quant`'s "reduce")."""
    return linear(x, InputsLastWeight(values, scale), strategy="reduce")


def reduced_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    """bf16 weights [K, N] the same way: XLA's column reduction."""
    return jnp.sum(x.astype(jnp.float32)[:, :, None] * w.astype(jnp.float32)[None], axis=1).astype(x.dtype)


def fused_kn(x: jax.Array, values_kn: jax.Array, scale: jax.Array) -> jax.Array:
    """The fused convert + dot over a weight stored [K, N] (the engine's layout before the fp8 GEMM's)."""
    return (jnp.tensordot(x, values_kn.astype(x.dtype), axes=1, preferred_element_type=jnp.float32) * scale
            ).astype(x.dtype)


def reduced_parts(x: jax.Array, values: jax.Array, scale: jax.Array, *, parts: int) -> jax.Array:
    """The one-row product as `parts` partial sums a channel (f32[M, N, parts], each over K / parts inputs), added
    after a barrier so that XLA keeps the reduction's shape: N * parts rows of K / parts instead of N rows of K."""
    (m, k), n = x.shape, values.shape[0]
    inputs = x.astype(jnp.float32).reshape(m, 1, parts, k // parts)
    partials = jnp.sum(inputs * decode(values, jnp.float32).reshape(n, parts, k // parts)[None], axis=-1)
    return (jax.lax.optimization_barrier(partials).sum(axis=-1) * scale).astype(x.dtype)


def e4m3_pairs_over_256(words: jax.Array) -> jax.Array:
    """u32[..., W] of e4m3 bytes -> float16[..., W, 2] of bytes 0 and 2 of each word, each value / 256, exactly.

    An e4m3 byte's sign moved to bit 15 and its exponent and mantissa to bits 13..7 make a float16 whose
    exponent field is e4m3's (bias 7 read as 15: 2^-8 times the value) and whose mantissa is e4m3's three bits
    followed by zeros; subnormals map onto float16 subnormals the same way. Two bytes a 32-bit operation;
    `words >> 8` gives bytes 1 and 3. NaN's code (0x7f) becomes a finite number: weights hold none."""
    return jax.lax.bitcast_convert_type(((words & 0x007F007F) << 7) | ((words & 0x00800080) << 8), jnp.float16)


def reduced_words(x: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:
    """The one-row product over e4m3 values [N, K] read as u32 words (four values each), decoded two at a time
    by `e4m3_pairs_over_256`, the 256 folded into the scale."""
    (m, k), n = x.shape, values.shape[0]
    words = jax.lax.bitcast_convert_type(decode_bytes(values).reshape(n, k // 4, 4), jnp.uint32)  # [N, K/4]
    inputs = x.astype(jnp.float32).reshape(m, 1, k // 4, 4)  # bytes 0..3 of each word, in memory order
    even, odd = e4m3_pairs_over_256(words)[None], e4m3_pairs_over_256(words >> 8)[None]  # bytes 0, 2 and 1, 3
    total = jnp.sum(even.astype(jnp.float32) * inputs[..., ::2] + odd.astype(jnp.float32) * inputs[..., 1::2],
                    axis=(-2, -1))
    return (total * (256 * scale)).astype(x.dtype)


def decode_bytes(values: jax.Array) -> jax.Array:  # e4m3 (or its bytes) -> u8, the same shape
    return values if values.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(values, jnp.uint8)


def time_variant(fn, x: jax.Array, weights: list[tuple[jax.Array, ...]]) -> float:
    """Milliseconds per matmul: `fn(x, *weight)` over every copy in one executable, outputs summed."""
    run = jax.jit(lambda x, ws: sum(jnp.sum(fn(x, *w)) for w in ws))
    return timed(lambda: run(x, weights), repeats=20) / len(weights)


def check(label: str, fn, x: jax.Array, weight: tuple[jax.Array, ...], kind: str) -> None:
    """`fn` against the f32 product of x and the weight it stands for (its dequantized values)."""
    values = weight[0].T if kind in ("int8", "fp8") else weight[0]  # the engine's [N, K] (`quantize`), or [K, N]
    dense = values.astype(jnp.float32) * (weight[1] if len(weight) > 1 else 1.0)
    want = x.astype(jnp.float32) @ dense
    error = float(jnp.max(jnp.abs(jax.jit(fn)(x, *weight).astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
    # bf16 outputs and fp8 activations (the native dot) round; a wrong kernel is off by O(1).
    if error > (0.1 if "native" in label else 0.02):
        raise SystemExit(f"{label}: relative error {error:.3g} against the f32 reference")


def sweep(k: int, n: int) -> list[dict[str, int]]:
    """Block choices that start between one and ~eight programs per SM of a 132-SM GPU."""
    choices = itertools.product((64, 128, 256), (64, 128, 256), (1, 2, 4, 8))
    return [dict(block_n=bn, block_k=bk, k_splits=ks) for bn, bk, ks in choices
            if 128 <= n // bn * ks <= 1100 or n <= 1024]


def fitting_blocks(k: int, n: int, rows: int, blocks: list[dict[str, int] | None]):
    """(label, blocks) for each block choice the Pallas kernels cover at this shape, e.g. "n=64 k=256 splits=2"."""
    for b in blocks:
        if b is not None and supports(rows, k, n, b["block_n"], b["block_k"], b["k_splits"]):
            yield " ".join(f"{key.split('_')[-1]}={val}" for key, val in b.items()), b


def variants(k: int, n: int, rows: int, blocks: list[dict[str, int] | None], interpret: bool, pallas: bool = True):
    """(label, fn(x, *weight), weight kind) for every matmul compared at this shape."""
    yield "bf16 dot", lambda x, w: x @ w, "bf16"
    if rows == 1 and pallas:  # whether a GEMV of ours streams bf16 as XLA's GEMM does (B1: its split-K sums cost ~2%)
        for label, b in fitting_blocks(k, n, rows, blocks):
            gemv = functools.partial(quantized_gemv, interpret=interpret, one_row=True, **b)
            yield f"bf16 pallas-row {label} [K,N]", lambda x, w, gemv=gemv: gemv(x, w, jnp.ones(w.shape[1])), "bf16"
    if not interpret:  # XLA:CPU has no fp8 dot
        yield "fp8 native dot", native_fp8, "fp8"
    yield "fp8 xla fused [K,N]", fused_kn, "fp8kn"
    if rows <= 4:  # a reduction reads the weight once a row
        yield "bf16 xla reduce", reduced_bf16, "bf16"
    for kind in ("fp8", "int8"):
        yield f"{kind} xla fused", fused, kind
        if rows <= 4:
            yield f"{kind} xla reduce", reduced, kind
        if rows == 1 and kind == "fp8":  # issue 21's B1 candidates (module docstring)
            for parts in (2, 4):
                yield f"fp8 xla reduce parts={parts}", functools.partial(reduced_parts, parts=parts), kind
            if k % 4 == 0:
                yield "fp8 words reduce", reduced_words, kind
        if not pallas:
            continue
        for label, b in fitting_blocks(k, n, rows, blocks if kind == "fp8" else blocks[:1]):  # int8: the default only
            gemv = functools.partial(quantized_gemv, interpret=interpret, **b)
            yield f"{kind} pallas {label} [K,N]", gemv, kind + "kn"
            if rows == 1 and kind == "fp8":
                yield f"{kind} pallas-row {label} [K,N]", functools.partial(gemv, one_row=True), kind + "kn"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--sweep", action="store_true", help="time every block choice of the Pallas kernels")
    parser.add_argument("--hlo", help="write the fused one-row path's optimized HLO into this folder")
    parser.add_argument("--no-pallas", action="store_true", help="XLA's paths only (bf16, fused, native fp8)")
    parser.add_argument("--hot", action="store_true", help="read one copy of each weight again (L2) instead of several")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode (CPU self-test)")
    args = parser.parse_args()
    shapes, interpret = (QUICK, True) if args.quick else (LLAMA3_8B, False)
    bandwidth = copy_bandwidth() if not args.quick else float("nan")
    print(f"{jax.devices()[0].device_kind}: copy bandwidth {format_bandwidth(bandwidth)} (read + write)")
    rng = np.random.default_rng(0)
    for name, (k, n) in shapes.items():
        copies = 1 if args.quick else max(2, math.ceil(3 * L2_BYTES / (k * n)))
        dense = [jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02, jnp.bfloat16) for _ in range(copies)]
        weights = {"bf16": [(w,) for w in dense]}
        weights |= {kind: [quantize(w, kind) for w in dense] for kind in ("int8", "fp8")}
        weights |= {kind + "kn": [(jnp.array(v.T), s) for v, s in weights[kind]] for kind in ("int8", "fp8")}
        if args.hot:
            weights = {kind: copies_of[:1] * copies for kind, copies_of in weights.items()}
        blocks = [gemv_blocks(k, n)] + (sweep(k, n) if args.sweep else [])
        for rows in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
            results = {}
            for label, fn, kind in variants(k, n, rows, blocks, interpret, pallas=not args.no_pallas):
                check(label, fn, x, weights[kind][0], kind)
                results[label] = (time_variant(fn, x, weights[kind]), 2 if kind == "bf16" else 1)
            if args.hlo and rows == 1:
                os.makedirs(args.hlo, exist_ok=True)
                text = jax.jit(fused).lower(x, *weights["fp8"][0]).compile().as_text()
                open(os.path.join(args.hlo, f"fused-fp8-{name}.hlo.txt"), "w").write(text)
            if args.hlo and not interpret:  # which library call the native dot became (cuBLASLt's fp8 GEMM?)
                text = jax.jit(native_fp8).lower(x, *weights["fp8"][0]).compile().as_text()
                calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
                print(f"{name} rows {rows} native: custom calls {calls}, transposes {text.count(' transpose(')}")
            shown = sorted(results.items(), key=lambda kv: kv[1][0])
            for kernel in ("fp8 pallas ", "fp8 pallas-row ", "bf16 pallas-row "):  # each kernel's fastest three blocks
                swept = [label for label, _ in shown if label.startswith(kernel)]
                shown = [(label, r) for label, r in shown if label not in swept[3:]]
            for label, (ms, bytes_per_weight) in shown:
                rate = k * n * bytes_per_weight / (ms * 1e-3)
                print(f"{name} [{k} x {n}] rows {rows}: {label:48s} {ms * 1e3:8.1f} us  "
                      f"{format_bandwidth(rate)} ({rate / bandwidth:.0%} of copy), "
                      f"{2 * rows * k * n / (ms * 1e-3) / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
