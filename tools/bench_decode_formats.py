"""The Pallas decode kernel over each KV page format, across its tunables, at one batch and context.

    python -m tools.bench_decode_formats --batch 512 --context 385 --policies 0,fp8,8 --ppb 1 --warps 1,4

Prints, per (format, pages per block, warps, stages): microseconds per call of one layer's decode
attention (Llama-3.1-8B's 32 query / 8 KV heads, D = 128, page 64 by default), the cache bytes it reads
and the bandwidth that makes. A quantized page holds half the bytes of a bf16 one, so at a large batch
the fp8 and int8 kernels should take about half the time if they stream at the bf16 kernel's rate
(docs/perf-notes.md, eleventh session: fp8 read 1.47 TB/s, bf16 2.46 in a 512-row B3 step).
`--quick` runs tiny shapes in interpret mode (a CPU self-test of the script).
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from tools.timing import timed
from xlkernels.kv_quant import kv_format, quantize_pages, token_head_bytes
from xlkernels.pallas_decode import paged_decode_attention


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--context", type=int, default=385, help="cached tokens per row (the new one included)")
    parser.add_argument("--heads", default="32,8", help="query heads, KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--policies", default="0,fp8,8", help="--quant-policy values")
    parser.add_argument("--ppb", default="1,2,4", help="pages per block")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.heads, args.head_dim, args.page_size = 4, 40, "4,2", 16, 16
    num_heads, num_kv = map(int, args.heads.split(","))
    pages_per_row = -(-args.context // args.page_size)
    num_pages = args.batch * pages_per_row + 1
    rng = np.random.default_rng(0)
    # Rows own distinct pages in a shuffled order (page 0 stays free), as a served batch's tables do.
    tables = jnp.asarray(1 + rng.permutation(num_pages - 1).reshape(args.batch, pages_per_row), jnp.int32)
    q = jnp.asarray(rng.standard_normal((args.batch, 1, num_heads, args.head_dim)), jnp.bfloat16)
    kv_lens = jnp.full((args.batch,), args.context, jnp.int32)
    positions = kv_lens[:, None] - 1
    shape = (num_kv, num_pages, args.page_size, args.head_dim)
    plain = [jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2)]
    print(f"{jax.devices()[0].device_kind}: batch {args.batch}, context {args.context}, heads {num_heads}/{num_kv}, "
          f"D {args.head_dim}, page {args.page_size}")
    print(f"{'format':7} {'ppb':>3} {'warps':>5} {'stages':>6} {'us':>8} {'MB':>7} {'TB/s':>6}")
    for policy in args.policies.split(","):
        kind = kv_format(policy)
        k_pages, v_pages = (quantize_pages(p, kind) for p in plain)
        read = 2 * args.batch * args.context * num_kv * token_head_bytes(kind, args.head_dim, jnp.bfloat16)
        tunables = (map(int, s.split(",")) for s in (args.ppb, args.warps, args.stages))
        for ppb, warps, stages in itertools.product(*tunables):
            def call(ppb=ppb, warps=warps, stages=stages, k_pages=k_pages, v_pages=v_pages):
                return paged_decode_attention(q, k_pages, v_pages, tables, positions, kv_lens,
                                              scale=args.head_dim ** -0.5, pages_per_block=ppb, num_warps=warps,
                                              num_stages=stages, interpret=args.quick)
            try:
                us = timed(call, repeats=3 if args.quick else 30) * 1e3
            except Exception as exc:  # a tunable Triton cannot fit (shared memory) is a row, not the end
                print(f"{kind or 'bf16':7} {ppb:3d} {warps:5d} {stages:6d} failed: "
                      f"{str(exc).splitlines()[0][:80]}")
                continue
            print(f"{kind or 'bf16':7} {ppb:3d} {warps:5d} {stages:6d} {us:8.1f} {read / 1e6:7.1f} "
                  f"{read / us / 1e6:6.2f}", flush=True)


if __name__ == "__main__":
    main()
