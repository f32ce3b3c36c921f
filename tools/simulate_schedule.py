"""Predict a serving run's length from the real scheduler and a step-cost model, before using the GPU.

    python -m tools.simulate_schedule --dataset sharegpt-like --prefill-tokens 128 \
        --prefill-rows 1 2 3 4 6 8 12 16 24 32 48 64

Runs `serving.engine.scheduler.Scheduler` turn by turn over a `tools.bench_serving` dataset (all
requests at once, ignore-eos lengths, no prefix caching) and charges each turn what the engine would
dispatch: a decode step, then a prefill step if any. The cost model is fitted to the H100 numbers in
docs/perf-notes.md: a step streams the 15 GB of Llama-3.1-8B weights (5.04 ms) or computes
2 x 7.5 GFLOP per padded token at ~600 TFLOP/s, whichever is longer; decode attention reads every row's
K/V (128 KiB a token) at ~2.2 TB/s; each program adds ~0.8 ms (norms, sampler, launches). It predicted
B2 at 34.5 s where the H100 took 39.2 s, and the +27% of 128-token prefill rows where the H100 gave
+24%: use it to rank scheduling ideas, not as a benchmark. It cannot rank decode bucket sets: it
charges every bucket below ~200 rows the same weight streaming, where on the H100 a 32-row step costs
7.8 ms against 5.6 ms for one row (docs/perf-notes.md, "B2: the tail's step size").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from serving.engine.config import BucketSet
from serving.engine.pages import PageAllocator
from serving.engine.scheduler import Chunk, Scheduler
from serving.request import EngineRequest, GenerationConfig
from tools.bench_serving import BenchRequest, sharegpt_like_dataset

WEIGHT_STREAM_MS = 5.04  # 15.01 GB at 2.98 TB/s (docs/benchmarks.md)
FLOPS_PER_TOKEN = 2 * 7.5e9  # Llama-3.1-8B matmuls, LM head included
MATMUL_FLOPS = 600e12  # what our GEMMs reach at a few hundred rows and more
KV_BYTES_PER_TOKEN = 131072  # 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
ATTENTION_BYTES_PER_S = 2.2e12  # the decode kernel on B=256 rows of a few hundred tokens
PROGRAM_OVERHEAD_MS = 0.8


def matmul_ms(tokens: int) -> float:
    return max(WEIGHT_STREAM_MS, FLOPS_PER_TOKEN * tokens / MATMUL_FLOPS * 1e3)


def decode_ms(rows: int, chunks: list[Chunk]) -> float:
    context = sum(c.start + 1 for c in chunks)
    return matmul_ms(rows) + context * KV_BYTES_PER_TOKEN / ATTENTION_BYTES_PER_S * 1e3 + PROGRAM_OVERHEAD_MS


@dataclass
class Prediction:
    seconds: float  # the run's length
    output_tokens: int
    turns: int
    decode_seconds: float
    prefill_seconds: float
    prefill_steps: int
    prompt_tokens: int  # prefilled
    padded_prompt_tokens: int  # what the prefill steps' buckets computed

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.seconds


def simulate(requests: list[BenchRequest], buckets: BucketSet, num_pages: int = 20000,
             page_size: int = 64) -> Prediction:
    """Run the scheduler over `requests` (all arriving at once) and add up the modelled step times."""
    scheduler = Scheduler(PageAllocator(num_pages), buckets, page_size, buckets.max_decode_batch,
                          max_session_len=num_pages * page_size, prefix_caching=False)
    for i, r in enumerate(requests):
        scheduler.add_request(EngineRequest(str(i), r.prompt, GenerationConfig(max_new_tokens=r.output_len)))
    ms = decode_total = prefill_total = 0.0
    turns = prefill_steps = out = real = padded = 0
    while scheduler.has_work:
        plan = scheduler.schedule()
        turns += 1
        if plan.decode:
            cost = decode_ms(buckets.decode_bucket(len(plan.decode)), plan.decode)
            decode_total += cost
            ms += cost
        if plan.prefill:
            total = sum(c.length for c in plan.prefill)
            shape = buckets.prefill_bucket(len(plan.prefill), max(c.length for c in plan.prefill), total)
            cost = matmul_ms(shape.packed) + PROGRAM_OVERHEAD_MS
            prefill_total += cost
            ms += cost
            prefill_steps += 1
            real += total
            padded += shape.packed
        for chunks in (plan.decode, plan.prefill):  # the step's effect: the scheduler's own update
            out += sum(chunk.samples for chunk in chunks)
            scheduler.update_from_output(chunks, [0] * len(chunks))
    return Prediction(ms / 1e3, out, turns, decode_total / 1e3, prefill_total / 1e3, prefill_steps, real, padded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="sharegpt-like", choices=["sharegpt-like"])
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--prefill-rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--packed-prefill", type=int, nargs="*", default=[])
    args = parser.parse_args()
    requests = sharegpt_like_dataset(args.num_prompts, 32000, args.seed)
    buckets = BucketSet(tuple(args.decode_batch), tuple(args.prefill_rows), tuple(args.prefill_tokens),
                        args.max_prefill_tokens, tuple(args.packed_prefill))
    p = simulate(requests, buckets)
    print(f"predicted: {p.seconds:.1f} s, {p.output_throughput:.0f} output tok/s, {p.turns} turns; decode "
          f"{p.decode_seconds:.1f} s, prefill {p.prefill_seconds:.1f} s in {p.prefill_steps} steps, "
          f"{p.prompt_tokens} prompt tokens padded to {p.padded_prompt_tokens} "
          f"({p.padded_prompt_tokens / p.prompt_tokens:.2f}x)")


if __name__ == "__main__":
    main()
