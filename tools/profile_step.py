"""Where a decode step's time goes: the engine's compiled step against its parts, on random weights.

    python -m tools.profile_step --shape llama3-8b --batches 1,64,256 --context 512

Prints, per batch size, the device time of: the runner's full step (model, cache write, attention,
seen-token update) plus the sampler; the model step alone, plain and (with --prefix-groups on a Pallas
backend, when the runner plans tiles) with shared-prefix attention; the sampler alone; the weights
streamed as plain GEMMs in our fused layout and in Hugging Face's [out, in] layout (the floor a decode
step cannot beat); and the copy bandwidth measured as a chain of copies. Each is timed as N
back-to-back dispatches, blocked once, so host dispatch is hidden whenever it is shorter than the
device work. runner.run takes the shared-prefix step whenever the plan has a tile, as the engine does.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.presets import PRESETS
from configs.shapes import SHAPES
from model.loader import init_random_params
from model.sharding import make_mesh
from model.weight_quant import stored_inputs_last
from serving.engine.config import BucketSet
from serving.engine.runner import ModelRunner
from serving.engine.sampling import ALL_GREEDY, SamplingBatch, sample
from serving.engine.scheduler import Chunk
from serving.request import EngineRequest, GenerationConfig
from tools.timing import copy_bandwidth, format_bandwidth, timed


def gemm_floor(params: dict, batch: int, hf_layout: bool) -> float:
    """Stream every weight once as a GEMM of `batch` rows (no attention, no norms): the step's floor."""
    layers = [params[k] for k in sorted(params) if k.startswith("layers_")]
    mats = [] if "lm_head" not in params else [params["lm_head"]["kernel"]]  # [in, out] everywhere below

    def in_out(w: jax.Array, in_dims: int) -> jax.Array:  # a layer's matmul weight as [in, out]
        if stored_inputs_last(None):  # [*out, *in] (every matmul weight on CPU)
            return jnp.asarray(w.reshape(-1, math.prod(w.shape[w.ndim - in_dims:])).T)
        return w.reshape(math.prod(w.shape[:in_dims]), -1)

    for layer in layers:
        mats += [in_out(layer["attn"]["wqkv"], 1), in_out(layer["attn"]["wo"], 2),
                 in_out(layer["mlp"]["w_gate_up"], 1), in_out(layer["mlp"]["w_down"], 1)]
    weights = [jnp.asarray(m.T) for m in mats] if hf_layout else mats
    out_in = [hf_layout] * len(mats)  # per weight: stored [out, in], contracted along its last dimension
    if "lm_head" not in params:  # a tied head is the embedding table, [vocab, hidden], contracted as it is
        weights, out_in = [params["embed"]["embedding"], *weights], [True, *out_in]
    widths = [w.shape[1] if t else w.shape[0] for w, t in zip(weights, out_in, strict=True)]  # static
    inputs = {width: jnp.ones((batch, width), weights[0].dtype) for width in widths}

    @jax.jit
    def stream(inputs, weights):
        total = jnp.zeros((batch,), jnp.float32)
        for width, transposed, w in zip(widths, out_in, weights, strict=True):
            y = inputs[width] @ w.T if transposed else inputs[width] @ w
            total = total + y[:, 0].astype(jnp.float32)
        return total

    return timed(lambda: stream(inputs, weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--session-len", type=int, default=0,
                        help="the block table's width in tokens (default: just the context); the XLA attention "
                             "reads only the context's pages, the reference the whole table")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--prefix-groups", type=int, default=0,
                        help="rows share their first --prefix-len tokens' pages in this many groups (row i in "
                             "group i %% N, as B4's arrival order gives); 0: every row's pages are its own")
    parser.add_argument("--prefix-len", type=int, default=2048)
    args = parser.parse_args()

    config = SHAPES[args.shape]
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    params = init_random_params(config, dtype, seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    pages_per_seq = -(-max(args.context + 1, args.session_len) // args.page_size)
    context_pages = -(-(args.context + 1) // args.page_size)
    # Shared prefix pages (the new token's page is always the row's own), then each row's own pages.
    shared_pages = min(args.prefix_len // args.page_size, context_pages - 1) if args.prefix_groups else 0
    own_pages = context_pages - shared_pages
    buckets = BucketSet(decode_batch=tuple(batches), prefill_rows=(1,), prefill_tokens=(64,),
                        max_prefill_tokens=PRESETS["gpu"]["max_prefill_tokens"])
    num_pages = args.prefix_groups * shared_pages + max(batches) * own_pages + 1
    runner = ModelRunner(config, params, dtype, num_pages, args.page_size, pages_per_seq, buckets,
                         num_slots=max(batches), mesh=make_mesh(1), attention_backend=args.attention_backend)
    t0 = time.perf_counter()
    runner.compile_all(progress=False)
    print(f"{jax.devices()[0].device_kind}: compiled {len(buckets.shapes())} shapes in "
          f"{time.perf_counter() - t0:.1f}s; copy bandwidth {format_bandwidth(copy_bandwidth())}", flush=True)
    request = EngineRequest("p", [1] * args.context, GenerationConfig(max_new_tokens=10**6), frozenset(), 0)
    rows = []
    for batch in batches:
        chunks = []
        for i in range(batch):
            own = 1 + args.prefix_groups * shared_pages + i * own_pages
            pages = list(range(own, own + own_pages))
            if args.prefix_groups:
                group = 1 + (i % args.prefix_groups) * shared_pages
                pages = list(range(group, group + shared_pages)) + pages
            chunks.append(Chunk(request=request, slot=i, admission=1, start=args.context - 1, length=1,
                                token_ids=[1], pages=pages, step=0, samples=True, first=False))
        step_ms = timed(lambda chunks=chunks, batch=batch: runner.run(chunks, batch, 1).tokens)
        token_ids, row_table, _, _, tiled_rows, _ = runner._inputs(chunks, batch, 1)
        token_ids, row_table = jax.device_put((token_ids, row_table))

        def model_only(run_step, token_ids=token_ids, row_table=row_table, batch=batch):
            # The decode bucket's program: (rows, tokens, packed, decode), as `ModelRunner.run` keys it.
            runner.cache, runner.seen, logits, *_ = run_step((batch, 1, None, 0), runner.params, runner.cache,
                                                             runner.seen, runner.last_tokens, token_ids, row_table)
            return logits

        model_ms = timed(functools.partial(model_only, runner._step))
        # The same step with the plan's tiles (a decode bucket of a Pallas backend, rows sharing pages).
        shared_ms = timed(functools.partial(model_only, runner._shared_step)) if tiled_rows else float("nan")
        start = time.perf_counter()
        for _ in range(30):  # the host's share of runner.run: building the step and sampling inputs
            runner._inputs(chunks, batch, 1)
        host_ms = (time.perf_counter() - start) / 30 * 1e3
        logits = jnp.asarray(np.random.default_rng(0).standard_normal((batch, config.vocab_size)), jnp.float32)
        seen = jnp.zeros((batch, config.vocab_size), bool)
        sampling = SamplingBatch.from_requests([], batch)
        sampler_ms = timed(functools.partial(jax.jit(sample, static_argnums=3), logits, sampling, seen, ALL_GREEDY))
        ours = gemm_floor(params, batch, hf_layout=False)
        hf = gemm_floor(params, batch, hf_layout=True)
        rows.append((batch, step_ms, model_ms, shared_ms, tiled_rows, sampler_ms, host_ms, ours, hf))
        print(f"B={batch}: runner.run {step_ms:.2f} ms, model step {model_ms:.2f} ms, with shared-prefix "
              f"attention {shared_ms:.2f} ms ({tiled_rows} rows in tiles), greedy sampler {sampler_ms:.3f} ms, "
              f"host input prep {host_ms:.3f} ms, GEMM floor ours {ours:.2f} ms / HF layout {hf:.2f} ms", flush=True)
    print("\n| batch | runner.run ms | model step ms | shared-prefix step ms | rows in tiles | sampler ms "
          "| host prep ms | GEMMs ours ms | GEMMs HF ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
