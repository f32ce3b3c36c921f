"""The fp8 MLP's tail on the GPU: silu(gate) * up scaled into e4m3 per row, then the w_down product (issue 21's B3).

    PYTHONUNBUFFERED=1 python -m tools.bench_mlp_quant [--rows 128,256,512] [--quick]

A 512-row fp8-weight decode step on the H100 spends ~2 ms of its ~19 ms scaling activations into e4m3
(docs/perf-notes.md, eleventh session): XLA computes the w_down input's absolute maximum per row in one
fusion (32 x 34 us, recomputing silu(gate) * up from the [rows, 2, F] product) and converts it in
another. The candidate here (`silu_mul_fp8`, a Pallas kernel: one program a row, two passes over the row
in chunks, the second from L2) reads gate and up once from HBM and writes only the e4m3 row and its
scale. Printed per row count: the quantization alone and the whole tail (quantization + fp8 dot), each
as XLA does it in the engine (`model.weight_quant`'s "native" strategy) and with the candidate, after a
check that both give the same product. --quick runs tiny shapes in interpret mode on CPU (no fp8 dot
there: the check and the timing cover the quantization only).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tools.timing import timed

E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)
LLAMA3_8B = (4096, 14336)  # hidden, ffn
QUICK = (64, 200)  # an ffn width that is no multiple of the chunk


def _silu_mul_fp8_kernel(gate_ref, up_ref, q_ref, scale_ref, *, width: int, chunk: int):
    # gate_ref, up_ref [F] one row's gate and up (two views of one [M, 2, F] array); q_ref e4m3[F]; scale_ref f32[1]
    steps = pl.cdiv(width, chunk)

    def hidden(i: jax.Array) -> tuple[jax.Array, jax.Array]:  # f32[chunk] (bf16-rounded, as the model's), mask
        cols = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
        live = cols < width
        gate = plgpu.load(gate_ref.at[pl.ds(i * chunk, chunk)], mask=live, other=0).astype(jnp.float32)
        up = plgpu.load(up_ref.at[pl.ds(i * chunk, chunk)], mask=live, other=0).astype(jnp.float32)
        h = gate / (1.0 + jnp.exp(-gate)) * up
        return h.astype(gate_ref.dtype).astype(jnp.float32), live

    absmax = jax.lax.fori_loop(0, steps, lambda i, m: jnp.maximum(m, jnp.max(jnp.abs(hidden(i)[0]))),
                               jnp.float32(0))
    scale = jnp.where(absmax > 0, absmax / E4M3_MAX, 1.0)

    def write(i: jax.Array, carry: jax.Array) -> jax.Array:
        h, live = hidden(i)
        plgpu.store(q_ref.at[pl.ds(i * chunk, chunk)], (h / scale).astype(q_ref.dtype), mask=live)
        return carry

    jax.lax.fori_loop(0, steps, write, 0)
    scale_ref[...] = jnp.full((1,), scale, jnp.float32)


@functools.partial(jax.jit, static_argnames=("chunk", "num_warps", "interpret"))
def silu_mul_fp8(gate_up: jax.Array, *, chunk: int = 1024, num_warps: int = 4,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """gate_up [M, 2, F] -> (e4m3[M, F], f32[M, 1]): silu(gate) * up, each row scaled by its absolute maximum."""
    rows, _, width = gate_up.shape
    return pl.pallas_call(
        functools.partial(_silu_mul_fp8_kernel, width=width, chunk=chunk),
        out_shape=[jax.ShapeDtypeStruct((rows, width), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((rows, 1), jnp.float32)],
        grid=(rows,),
        in_specs=[pl.BlockSpec((None, None, width), lambda r: (r, 0, 0)),
                  pl.BlockSpec((None, None, width), lambda r: (r, 1, 0))],
        out_specs=[pl.BlockSpec((None, width), lambda r: (r, 0)), pl.BlockSpec((None, 1), lambda r: (r, 0))],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="silu_mul_fp8",
    )(gate_up, gate_up)


def xla_quantized(gate_up: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What the engine runs: the model's hidden (bf16), then `weight_quant._native_fp8`'s row scaling."""
    hidden = (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]).astype(jnp.float32)
    scale = jnp.max(jnp.abs(hidden), axis=1, keepdims=True) / E4M3_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return (hidden / scale).astype(jnp.float8_e4m3fn), scale


def fp8_product(q: jax.Array, row_scale: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:
    """e4m3 rows [M, F] times e4m3 values [N, F] (the engine's w_down), both scales applied: bf16[M, N]."""
    y = jax.lax.dot_general(q, values, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * row_scale * scale).astype(jnp.bfloat16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="128,256,512")
    parser.add_argument("--chunks", default="512,1024,2048")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode (CPU self-test)")
    args = parser.parse_args(argv)
    hidden, ffn = QUICK if args.quick else LLAMA3_8B
    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.standard_normal((hidden, ffn)) * 100, jnp.float8_e4m3fn)
    scale = jnp.full((hidden,), 1e-3, jnp.float32)
    xla, xla_tail = jax.jit(xla_quantized), jax.jit(lambda gu: fp8_product(*xla_quantized(gu), values, scale))
    print(f"{jax.devices()[0].device_kind}: hidden {hidden}, ffn {ffn}")
    for rows in map(int, args.rows.split(",")):
        gate_up = jnp.asarray(rng.standard_normal((rows, 2, ffn)) * 2, jnp.bfloat16)
        want_q, want_scale = xla(gate_up)
        results = {"xla": timed(lambda gate_up=gate_up: xla(gate_up), repeats=3 if args.quick else 50)}
        if not args.quick:
            results["xla + dot"] = timed(lambda gate_up=gate_up: xla_tail(gate_up))
        for chunk in map(int, args.chunks.split(",")):
            kernel = functools.partial(silu_mul_fp8, chunk=chunk, interpret=args.quick)
            q, row_scale = kernel(gate_up)
            # The same rows up to one e4m3 step where the bf16 roundings of the hidden differ.
            np.testing.assert_allclose(np.asarray(row_scale), np.asarray(want_scale), rtol=1e-2)
            got, want = (np.asarray(x.astype(jnp.float32)) * np.asarray(s) for x, s in ((q, row_scale),
                                                                                        (want_q, want_scale)))
            assert np.abs(got - want).max() <= np.abs(want).max() * 0.07, f"chunk {chunk}: the rows differ"
            results[f"pallas {chunk}"] = timed(lambda gate_up=gate_up, kernel=kernel: kernel(gate_up),
                                               repeats=3 if args.quick else 50)
            if not args.quick:
                tail = jax.jit(lambda gu, kernel=kernel: fp8_product(*kernel(gu), values, scale))
                results[f"pallas {chunk} + dot"] = timed(lambda gate_up=gate_up, tail=tail: tail(gate_up))
        read = rows * 2 * ffn * 2 + rows * ffn  # gate and up in, e4m3 rows out
        print(f"rows {rows}: " + ", ".join(f"{name} {ms * 1e3:.1f} us" for name, ms in results.items())
              + f" (the quantization's bytes {read / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
