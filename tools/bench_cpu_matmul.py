"""Time a decode step's few-row float32 products on CPU: XLA's dot against the native kernel, side by side.

    python -m tools.bench_cpu_matmul [--rows 1,16] [--rounds 7] [--quick]

SmolLM2-135M's products (30 layers: wqkv [576 -> 576 + 2 * 192], wo [576 -> 576], w_gate_up
[576 -> 2 * 1536], w_down [1536 -> 576]; the tied head [576 -> 49152]), f32 weights stored [N, K] as the
engine stores them on CPU. "xla" is `weight_quant._transposed`, the engine's product (XLA:CPU's dot with
the weight as its left operand); "native" is `xlkernels.cpu_matmul.rows_matmul`. Both are checked against
numpy first.

Method: one program per shape and path runs the 30 layers' products in a chain (each product's input
depends on the previous output by a negligible add, as in a step: nothing runs concurrently), over 30
distinct weights, so they stream from memory as a step's do (~425 MB for the layers, 113 MB for the head).
The paths alternate call by call for `rounds` rounds (this VM's neighbours move CPU figures by 20-40%
within minutes) and the median is printed. --quick: tiny shapes, one round (to test this script).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from model.weight_quant import _transposed
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
    weights = {name: [jnp.asarray(rng.standard_normal((n, k), np.float32)) for _ in range(copies)]
               for name, (n, k, copies) in dims.shapes().items()}
    paths: dict[str, Product] = {"xla": _transposed, "native": rows_matmul}
    print(f"{jax.devices()[0].device_kind}, {jax.local_device_count()} device(s); {rounds} rounds, medians")
    for rows in map(int, args.rows.split(",")):
        totals = {path: 0.0 for path in paths}
        flops_total = 0
        for name, ws in weights.items():
            x = jnp.asarray(rng.standard_normal((rows, ws[0].shape[1])).astype(np.float32))
            if not native_matmul_applies(x, ws[0]):
                raise SystemExit(f"the native kernel does not apply to {rows} x {ws[0].shape} (no compiler?)")
            expected = np.asarray(x, np.float64) @ np.asarray(ws[0], np.float64).T
            bound = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(ws[0], np.float64)).T
            runs = {}
            for path, product in paths.items():
                error = np.max(np.abs(np.asarray(jax.jit(product)(x, ws[0])) - expected) / bound)
                if error > 1e-5:
                    raise SystemExit(f"{path} {name} at {rows} rows: relative error {error:.2e}")
                runs[path] = jax.jit(chained(product))
                runs[path](x, ws).block_until_ready()  # compile and warm up
            times: dict[str, list[float]] = {path: [] for path in paths}
            for _ in range(rounds):
                for path, run in runs.items():
                    start = time.perf_counter()
                    run(x, ws).block_until_ready()
                    times[path].append(time.perf_counter() - start)
            n, k = ws[0].shape
            flops = 2 * rows * n * k * len(ws)
            flops_total += flops
            cells = []
            for path in paths:
                seconds = statistics.median(times[path])
                totals[path] += seconds
                cells.append(f"{path} {seconds * 1e3:7.2f} ms {flops / seconds / 1e9:6.1f} GFLOP/s")
            ratio = statistics.median(times["xla"]) / statistics.median(times["native"])
            print(f"rows {rows:2d} {name:9s} [{k:4d} -> {n:5d}] x{len(ws):2d}: " + "  ".join(cells)
                  + f"  native {ratio:.2f}x")
        cells = [f"{path} {totals[path] * 1e3:7.2f} ms {flops_total / totals[path] / 1e9:6.1f} GFLOP/s"
                 for path in paths]
        print(f"rows {rows:2d} all (layers + head){' ' * 12}: " + "  ".join(cells)
              + f"  native {totals['xla'] / totals['native']:.2f}x")


if __name__ == "__main__":
    main()
