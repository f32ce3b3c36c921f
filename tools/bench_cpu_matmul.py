"""Time a decode step's few-row products on CPU side by side: XLA's f32 dot, the native f32 kernel, the
products over bfloat16 weights (`--weight-quant bf16`), and over GGUF Q4_1 blocks (`--weight-quant q4_1`, the
native kernel of xlkernels/cpu_blocks.cc, float32 arithmetic on the blocks' exact weights, stored as the engine
stores them: on AMX tiles where the CPU has them, the lanes form where it has AVX-512 without them; and
`q4_1-avx`, the kernel's dot form over the file's layout).

    python -m tools.bench_cpu_matmul [--rows 1,16] [--rounds 7] [--quick]

SmolLM2-135M's products (30 layers: wqkv [576 -> 576 + 2 * 192], wo [576 -> 576], w_gate_up
[576 -> 2 * 1536], w_down [1536 -> 576]; the tied head [576 -> 49152]), f32 weights stored [N, K] as the
engine stores them on CPU. "xla" is `weight_quant._transposed`, the engine's product (XLA:CPU's dot with
the weight as its left operand); "native" is `xlkernels.cpu_matmul.rows_matmul`; "bf16" is `_transposed` over
the weights rounded to bfloat16 (a bf16 dot, on the AMX tiles where the CPU has them, or at one row the
native bf16 kernel). Each is checked against numpy first.

Method: one program per shape and path runs the 30 layers' products in a chain (each product's input
depends on the previous output by a negligible add, as in a step: nothing runs concurrently), over 30
distinct weights, so they stream from memory as a step's do (~425 MB for the layers, 113 MB for the head).
The paths alternate call by call for `rounds` rounds (this VM's neighbours move CPU figures by 20-40%
within minutes) and the median is printed. --quick: tiny shapes, one round (to test this script).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from model.weight_quant import InputsLastWeight, _transposed, linear, quantize_blocks, stored_weight
from xlkernels.cpu_blocks import blocks_matmul, dequantize_blocks, lanes_applies
from xlkernels.cpu_matmul import native_matmul_applies, rows_matmul

Product = Callable[[jax.Array, jax.Array], jax.Array]


@dataclass(frozen=True)
class Dims:
    embed: int = 576
    ffn: int = 1536
    kv: int = 192  # 3 KV heads of 64
    vocab: int = 49152
    layers: int = 30

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """name -> (N, K, copies)."""
        e, f, n = self.embed, self.ffn, self.layers
        return {"wqkv": (e + 2 * self.kv, e, n), "wo": (e, e, n), "w_gate_up": (2 * f, e, n),
                "w_down": (e, f, n), "head": (self.vocab, e, 1)}


QUICK = Dims(embed=64, ffn=96, kv=16, vocab=512, layers=2)


def chained(product: Product) -> Callable[[jax.Array, list[jax.Array]], jax.Array]:
    def run(x: jax.Array, weights: list[jax.Array]) -> jax.Array:
        for w in weights:
            y = product(x, w)
            x = x + 1e-30 * y[:, :1]  # the next product waits for this one, as in a step
        return x
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16", help="comma-separated row counts (1..16)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed calls per path")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round")
    args = parser.parse_args(argv)
    dims, rounds = (QUICK, 1) if args.quick else (Dims(), args.rounds)
    rng = np.random.default_rng(0)
    f32 = {name: [jnp.asarray(rng.standard_normal((n, k), np.float32)) for _ in range(copies)]
           for name, (n, k, copies) in dims.shapes().items()}
    quantize = jax.jit(quantize_blocks, static_argnums=1)
    q4_1 = {name: [quantize(w, "q4_1") for w in ws] for name, ws in f32.items()}  # the file's layout
    store = jax.jit(lambda w: stored_weight(w.T, np.dtype(np.float32), "q4_1", 1)[0])
    stored = {name: [store(w) for w in ws] for name, ws in f32.items()}  # as the engine stores them (lanes?)
    # path -> (product, the weights it reads, its error bound relative to the sum of the terms' magnitudes)
    paths: dict[str, tuple[Product, dict[str, list[jax.Array]], float]] = {
        "xla": (_transposed, f32, 1e-5),
        "native": (rows_matmul, f32, 1e-5),
        # the rows are rounded to bf16 too (8 significant bits) before an exact-product, f32-sum dot
        "bf16": (_transposed, {name: [w.astype(jnp.bfloat16) for w in ws] for name, ws in f32.items()}, 1e-2),
        # exact against the blocks' own weights (`exact_weight`), stored as the engine stores them
        "q4_1": (lambda x, w: linear(x, InputsLastWeight(w, None, 1, "q4_1", lanes_applies(w.shape))), stored, 1e-5),
        # the kernel's dot form over the file's layout (not the tiles where the CPU has AMX, nor the lanes form)
        "q4_1-avx": (lambda x, w: blocks_matmul(x, w, "q4_1", tiles=False), q4_1, 1e-5),
    }
    print(f"{jax.devices()[0].device_kind}, {jax.local_device_count()} device(s); {rounds} rounds, medians")
    for rows in map(int, args.rows.split(",")):
        totals = {path: 0.0 for path in paths}
        flops_total = 0
        for name in f32:
            x = jnp.asarray(rng.standard_normal((rows, f32[name][0].shape[1])).astype(np.float32))
            if not native_matmul_applies(x, f32[name][0]):
                raise SystemExit(f"the native kernel does not apply to {rows} x {f32[name][0].shape} (no compiler?)")
            runs = {}
            for path, (product, weights, bound) in paths.items():
                w = np.asarray(exact_weight(weights[name][0]), np.float64)
                x64 = np.asarray(x, np.float64)
                error = np.max(np.abs(np.asarray(jax.jit(product)(x, weights[name][0])) - x64 @ w.T)
                               / (np.abs(x64) @ np.abs(w).T))
                if error > bound:
                    raise SystemExit(f"{path} {name} at {rows} rows: relative error {error:.2e}")
                runs[path] = functools.partial(jax.jit(chained(product)), x, weights[name])
                runs[path]().block_until_ready()  # compile and warm up
            times: dict[str, list[float]] = {path: [] for path in paths}
            for _ in range(rounds):
                for path, run in runs.items():
                    start = time.perf_counter()
                    run().block_until_ready()
                    times[path].append(time.perf_counter() - start)
            n, k = f32[name][0].shape
            flops = 2 * rows * n * k * len(f32[name])
            flops_total += flops
            medians = {path: statistics.median(times[path]) for path in paths}
            for path in paths:
                totals[path] += medians[path]
            print(f"rows {rows:2d} {name:9s} [{k:4d} -> {n:5d}] x{len(f32[name]):2d}: " + row(medians, flops))
        print(f"rows {rows:2d} all (layers + head){' ' * 12}: " + row(totals, flops_total))


def exact_weight(w: jax.Array) -> jax.Array:  # f32[N, K]
    """The float32 weight a product's operand stands for: itself, widened, or its Q4_1 blocks decoded."""
    return dequantize_blocks(w, "q4_1", lanes_applies(w.shape)) if w.dtype == jnp.uint8 else w.astype(jnp.float32)


def row(seconds: dict[str, float], flops: int) -> str:
    """Each path's time and rate, then each path's speed-up over XLA's f32 product."""
    cells = [f"{path} {s * 1e3:7.2f} ms {flops / s / 1e9:6.1f} GFLOP/s" for path, s in seconds.items()]
    ratios = [f"{path} {seconds['xla'] / s:.2f}x" for path, s in seconds.items() if path != "xla"]
    return "  ".join(cells + ratios)


if __name__ == "__main__":
    main()
