"""End-to-end greedy parity of two attention backends on the same weights (the GPU gate for a kernel).

    python -m tools.check_backend_parity --shape llama3-8b --backends xla,pallas --num-prompts 32

Runs the same prompts through two engines that share one set of random weights and reports, per
prompt, whether the greedy tokens agree and where they first diverge.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from configs.shapes import SHAPES
from model.loader import init_random_params
from model.sharding import make_mesh
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine, resolve_dtype
from serving.engine.request import GenerationConfig
from tools.bench_engine import run_requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--backends", default="xla,pallas")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    model_config = SHAPES[args.shape]
    # Few shapes, so each engine compiles in seconds: one decode batch for all prompts, small chunks.
    options = dict(session_len=1024, num_pages=1024, page_size=64, decode_batch_buckets=(args.num_prompts,),
                   prefill_row_buckets=(1, 4), prefill_token_buckets=(128, 512), max_prefill_token_num=2048)
    dtype = resolve_dtype("auto", model_config, jax.devices()[0].platform)
    mesh = make_mesh(1)
    params = init_random_params(model_config, dtype, seed=0, mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model_config.vocab_size, size=int(n)).tolist()
               for n in rng.integers(8, 600, size=args.num_prompts)]
    backends = args.backends.split(",")
    results = []
    for backend in backends:
        engine = Engine(model_config, params, None, EngineConfig(attention_backend=backend, **options), mesh=mesh)
        engine.start()
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
        results.append([record["tokens"] for record in run_requests(engine, prompts, config)])
        engine.shutdown()
        del engine
    first, second = results
    same = sum(a == b for a, b in zip(first, second, strict=True))
    print(f"{args.shape} on {jax.devices()[0].device_kind}: {same}/{len(prompts)} prompts give identical greedy "
          f"tokens ({args.max_new_tokens} each) with {' and '.join(backends)}")
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a != b:
            at = next(k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            print(f"  prompt {i} ({len(prompts[i])} tokens) first differs at output token {at}")


if __name__ == "__main__":
    main()
