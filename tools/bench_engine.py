"""Offline engine benchmarks: single-stream decode and fixed-length throughput, against the roofline.

    python -m tools.bench_engine --shape llama3-8b single --input-len 128 --output-len 1024
    python -m tools.bench_engine --shape llama3-8b throughput --num-prompts 1000 --input-len 256 --output-len 256
    python -m tools.bench_engine --shape llama3-8b throughput --dataset sharegpt-like  # B2's requests, no HTTP
    python -m tools.bench_engine --model /models/Llama-3.1-8B throughput ...
    python -m tools.bench_engine --model SmolLM2-135M-Instruct.Q4_1.gguf --session-len 8192 \
        --baseline transformers single --input-len 64 --output-len 128
    python -m tools.bench_engine --model ... --baseline transformers embed --num-prompts 256 --input-len 128

`--shape` runs random weights at a named model shape (configs/shapes.py), where checkpoints cannot be
downloaded. The roofline is the time to stream the weights once per decode step (the input embedding
is gathered, not streamed) at the measured copy bandwidth; `--bandwidth` overrides the measurement.
`--baseline transformers` then runs the same prompts through transformers' `generate` in this process,
after the engine has stopped (tools/transformers_baseline.py: one stream's decode rate for `single`, the
prompts as one static batch for `throughput`, the decoder's forward in batches for `embed`), and prints
xlserve's figure over transformers'. `embed` runs prompt-only embedding requests (POST /v1/embeddings' work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time

import jax
import numpy as np

from serving.engine.config import EngineConfig
from serving.engine.engine import Engine, TurnRecord, resolve_dtype, with_weight_quant
from serving.request import EngineOutput, GenerationConfig, Guide
from serving.text.grammar import GuideCompiler, GuideSpec
from serving.text.pooling import pooled
from tools.bench_serving import sharegpt_like_dataset
from tools.timing import copy_bandwidth, format_bandwidth


def build_engine(args: argparse.Namespace) -> Engine:
    options = dict(
        page_size=args.page_size,
        session_len=args.session_len,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        preset=args.preset,
        tp=args.tp,
        compilation_cache_dir=args.compilation_cache_dir,
        load_format=args.load_format,
        num_pages=args.num_pages,
        quant_policy=args.quant_policy,
        weight_quant=args.weight_quant,
        lm_head_quant=args.lm_head_quant,
    )
    if args.max_batch_size:
        options["max_batch_size"] = args.max_batch_size
    for option, value in (
        ("decode_batch_buckets", args.decode_buckets),
        ("prefill_row_buckets", args.prefill_rows),
        ("prefill_token_buckets", args.prefill_tokens),
        ("max_prefill_token_num", args.max_prefill_tokens),
        ("packed_prefill_buckets", args.packed_prefill),
        ("mixed_decode_buckets", args.mixed_decode),
    ):
        if value:
            options[option] = tuple(int(v) for v in value.split(",")) if isinstance(value, str) else value
    config = EngineConfig.from_options(**options)
    if args.model:
        return Engine.from_pretrained(args.model, config)
    from configs.shapes import SHAPES
    from model.loader import init_random_params
    from model.sharding import make_mesh

    model_config = with_weight_quant(SHAPES[args.shape], config.weight_quant, config.lm_head_quant)
    dtype = resolve_dtype(config.dtype, model_config, jax.devices()[0].platform)
    mesh = make_mesh(config.tp)
    params = init_random_params(model_config, dtype, seed=0, mesh=mesh)
    return Engine(model_config, params, tokenizer=None, config=config, mesh=mesh)


def streamed_weight_bytes(params: dict) -> int:
    """Bytes one decode step must read: every weight except the gathered input embedding (unless tied)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(leaf.nbytes for path, leaf in leaves)
    embed = params["embed"]["embedding"]
    return total - (0 if "lm_head" not in params else embed.nbytes)


def run_requests(engine: Engine, prompts: list[list[int]], configs: list[GenerationConfig],
                 guide: Guide | None = None, embed: bool = False) -> list[dict]:
    """Submit all prompts at once (each constrained by `guide`, if any; embedding requests with `embed`); record
    each request's tokens and their arrival times, and its embedding."""
    records = [{"times": [], "tokens": []} for _ in prompts]
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(out: EngineOutput) -> None:
            now = time.perf_counter()
            records[i]["times"].extend([now] * len(out.new_token_ids))
            records[i]["tokens"].extend(out.new_token_ids)
            if out.finished:
                records[i]["reason"] = out.finish_reason.value if out.finish_reason else None
                records[i]["embedding"] = out.embedding
                done.release()

        return sink

    start = time.perf_counter()
    for i, (prompt, config) in enumerate(zip(prompts, configs, strict=True)):
        request = engine.make_request(prompt, config, f"bench-{i}-{start}")
        request.guide, request.embed = guide, embed
        engine.submit(request, sink_for(i))
    for _ in prompts:
        done.acquire()
    for record in records:
        record["start"] = start
    return records


def phase_table(turns: list[TurnRecord], records: list[dict], phases: int = 10) -> list[dict]:
    """The run cut into `phases` equal spans of time: per span, the turns, their mean length, how long
    the host waited for the device each turn (near 0: the host sets the pace), the rows decoding, the
    prompt tokens prefilled and the output tokens delivered."""
    start, end = turns[0].start, turns[-1].read
    token_times = np.sort(np.concatenate([np.asarray(r["times"]) for r in records]))
    span = (end - start) / phases
    table = []
    for k in range(phases):
        lo, hi = start + k * span, (start + (k + 1) * span if k < phases - 1 else np.inf)  # the last token is at `end`
        chosen = [t for t in turns if lo <= t.start < hi]
        n = max(len(chosen), 1)
        table.append({
            "t0_s": lo - start,
            "turns": len(chosen),
            "turn_ms": span / n * 1e3,
            "wait_ms": sum(t.device_ready - t.dispatched for t in chosen) / n * 1e3,
            "decode_rows": sum(t.decode_rows for t in chosen) / n,
            "prefill_tokens": sum(t.prefill_tokens for t in chosen),
            "output_tokens": int(np.count_nonzero((token_times >= lo) & (token_times < hi))),
        })
    return table


def trace_window(folder: str, after: float, seconds: float) -> None:
    """Profile `seconds` of whatever runs from `after` seconds on, from a timer thread."""
    def window() -> None:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        time.sleep(seconds)
        jax.profiler.stop_trace()

    threading.Timer(after, window).start()


def report_timeline(path: str, turns: list[TurnRecord], records: list[dict], prompts: list[list[int]]) -> None:
    """Print the run's phase table; write it, every turn and each request's token times to `path` (JSON)."""
    table = phase_table(turns, records)
    print("   t0 s  turns  turn ms  wait ms  decode rows  prefill tok  output tok")
    for row in table:
        print(f"{row['t0_s']:7.1f} {row['turns']:6d} {row['turn_ms']:8.2f} {row['wait_ms']:8.2f} "
              f"{row['decode_rows']:12.1f} {row['prefill_tokens']:12d} {row['output_tokens']:11d}")
    with open(path, "w") as f:
        json.dump({"phases": table, "turns": [dataclasses.astuple(t) for t in turns],
                   "requests": [{"start": r["start"], "first": r["times"][0], "last": r["times"][-1],
                                 "tokens": len(r["times"]), "prompt": len(p)}
                                for r, p in zip(records, prompts, strict=True)]}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local Hugging Face checkpoint directory")
    source.add_argument("--shape", help="random weights at a named shape (configs/shapes.py), e.g. llama3-8b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto", help="dummy: random weights at --model's shapes")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (devices)")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--quant-policy", default="0", choices=["0", "4", "8", "fp8"], help="KV cache quantization")
    parser.add_argument("--weight-quant", choices=["int8", "fp8", "bf16"], help="weights quantized at load (bf16: CPU)")
    parser.add_argument("--lm-head-quant", choices=["int8"], help="the LM head quantized at load too")
    parser.add_argument("--num-pages", type=int, help="explicit KV page count (default: the memory budget's)")
    parser.add_argument("--session-len", type=int, default=4096)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--decode-buckets", help="comma-separated decode batch buckets (default: the preset's)")
    parser.add_argument("--prefill-rows", help="comma-separated prefill row buckets")
    parser.add_argument("--prefill-tokens", help="comma-separated prefill token buckets")
    parser.add_argument("--max-prefill-tokens", type=int, help="tokens one prefill step may process")
    parser.add_argument("--packed-prefill", help="comma-separated packed prefill buckets (EngineConfig)")
    parser.add_argument("--mixed-decode", help="comma-separated mixed step decode buckets (EngineConfig)")
    parser.add_argument("--compilation-cache-dir", default="auto", help="auto, off or a directory (EngineConfig)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampled requests")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--guided-regex", help="constrain every request to this regex (structured output); "
                        "make it one that never ends, as requests run to --output-len")
    parser.add_argument("--guided-backend", choices=["device", "host"], default="device",
                        help="where the --guided-regex automaton runs")
    parser.add_argument("--logprobs", type=int, default=None,
                        help="every request asks for this many top log probabilities (the extended sampler)")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="every request's presence penalty (the extended sampler, no log probabilities)")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s for the roofline (default: measure)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--baseline", choices=["transformers"], help="also run the prompts through transformers "
                        "(--model only) and report the ratio")
    parser.add_argument("--baseline-dtype", default="float32", help="the transformers run's dtype")
    sub = parser.add_subparsers(dest="mode", required=True)
    single = sub.add_parser("single", help="one stream: decode tokens per second")
    single.add_argument("--input-len", type=int, default=128)
    single.add_argument("--output-len", type=int, default=1024)
    single.add_argument("--repeats", type=int, default=2)
    single.add_argument("--trace", help="after timing, profile a 32-token stream into this folder (perfetto)")
    capacity = sub.add_parser("capacity", help="only the KV cache the memory budget holds (pages, tokens) with "
                              "each --policies; compiles nothing")
    capacity.add_argument("--policies", nargs="+", default=["0", "8", "fp8", "4"], help="--quant-policy values")
    through = sub.add_parser("throughput", help="many fixed-length requests at once: output tokens per second")
    through.add_argument("--num-prompts", type=int, default=1000)
    through.add_argument("--input-len", type=int, default=256)
    through.add_argument("--output-len", type=int, default=256)
    through.add_argument("--dataset", choices=["fixed", "sharegpt-like"], default="fixed",
                         help="sharegpt-like: B2's prompts and output lengths (tools.bench_serving), offline")
    through.add_argument("--timeline", help="record every loop turn; write them and a per-phase table here (JSON)")
    through.add_argument("--trace", help="profile a window of the run into this folder (perfetto)")
    through.add_argument("--trace-window", default="5,0.3",
                         help="the profiled window: seconds after the first request, then its length")
    embed = sub.add_parser("embed", help="many embedding requests at once (prompt only): input tokens per second")
    embed.add_argument("--num-prompts", type=int, default=256)
    embed.add_argument("--input-len", type=int, default=128)
    args = parser.parse_args()
    if args.baseline and not args.model:
        parser.error("--baseline needs --model: transformers cannot load a --shape")

    engine = build_engine(args)
    if args.mode == "capacity":
        report_capacity(engine, args)
        return
    t0 = time.perf_counter()
    engine.start()
    started = time.perf_counter() - t0
    weight_bytes = streamed_weight_bytes(engine.runner.params)
    bandwidth = args.bandwidth or copy_bandwidth()
    floor_ms = weight_bytes / bandwidth * 1e3
    print(
        f"device {jax.devices()[0].device_kind}; started in {started:.1f}s "
        f"(compile {engine.compile_seconds:.1f}s); weights streamed per step {weight_bytes / 1e9:.2f} GB; "
        f"bandwidth {format_bandwidth(bandwidth)}; batch-1 floor {floor_ms:.2f} ms/token; "
        f"KV cache {engine.num_pages} pages of {engine.page_size} tokens ({engine.num_pages * engine.page_size} "
        f"tokens, quant policy {args.quant_policy}, weights {engine.model_config.weight_quant or engine.dtype_name})",
        flush=True,
    )
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    config = GenerationConfig(
        max_new_tokens=getattr(args, "output_len", 0),  # embed: prompt only
        ignore_eos=True,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        random_seed=0,
        logprobs=args.logprobs,
        presence_penalty=args.presence_penalty,
    )
    guide = None
    if args.guided_regex:  # the engine's EOS ends it: requests still run to --output-len (ignore_eos)
        compiler = GuideCompiler(engine.tokenizer, vocab)
        guide = compiler.compile(GuideSpec("regex", args.guided_regex, "--guided-regex", args.guided_backend),
                                 engine.eos_token_ids)
    compiles_before = engine.stats().compilations_after_warmup
    result: dict = {
        "mode": args.mode,
        "device": jax.devices()[0].device_kind,
        "weights_gb": weight_bytes / 1e9,
        "bandwidth_tbs": bandwidth / 1e12,
        "compile_s": engine.compile_seconds,
    }
    if args.mode == "single":
        rates = []
        for _ in range(args.repeats):
            prompt = rng.integers(0, vocab, size=args.input_len).tolist()
            (record,) = run_requests(engine, [prompt], [config], guide)
            times = record["times"]
            ms_per_token = (times[-1] - times[0]) / (len(times) - 1) * 1e3
            rates.append(ms_per_token)
            print(
                f"  TTFT {(times[0] - record['start']) * 1e3:.1f} ms, decode {ms_per_token:.2f} ms/token "
                f"= {1e3 / ms_per_token:.1f} tok/s",
                flush=True,
            )
        if args.trace:  # timeline of host dispatch and device kernels, for docs/perf-notes.md
            with jax.profiler.trace(args.trace, create_perfetto_trace=True):
                run_requests(engine, [prompt], [GenerationConfig(max_new_tokens=32, ignore_eos=True)])
        best = min(rates)
        result.update(ms_per_token=best, tok_s=1e3 / best, roofline_ratio=floor_ms / best)
        baseline_prompts = [prompt]
        print(
            f"single stream: {1e3 / best:.1f} tok/s ({best:.2f} ms/token), {floor_ms / best:.0%} of the "
            f"memory roofline ({floor_ms:.2f} ms)"
        )
    elif args.mode == "embed":
        prompts = [rng.integers(0, vocab, size=args.input_len).tolist() for _ in range(args.num_prompts)]
        start = time.perf_counter()
        records = run_requests(engine, prompts, [GenerationConfig(max_new_tokens=0)] * len(prompts), embed=True)
        elapsed = time.perf_counter() - start
        tokens = sum(map(len, prompts))
        result.update(input_tok_s=tokens / elapsed, req_s=len(prompts) / elapsed, seconds=elapsed,
                      embeddings=[r["embedding"] for r in records[:4]])
        baseline_prompts = prompts
        print(f"embeddings: {len(prompts)} x {args.input_len} tokens: {tokens / elapsed:.0f} input tok/s, "
              f"{len(prompts) / elapsed:.2f} req/s in {elapsed:.1f}s")
    else:
        if args.dataset == "sharegpt-like":
            requests = sharegpt_like_dataset(args.num_prompts, min(vocab, 32000), seed=0)  # B2's prompts
            prompts = [r.prompt for r in requests]
            configs = [dataclasses.replace(config, max_new_tokens=r.output_len) for r in requests]
            shape = "sharegpt-like"
        else:
            prompts = [rng.integers(0, vocab, size=args.input_len).tolist() for _ in range(args.num_prompts)]
            configs = [config] * len(prompts)
            shape = f"{args.input_len}/{args.output_len}"
        engine.timeline = [] if args.timeline else None
        start = time.perf_counter()
        if args.trace:  # a window of the steady state: which kernels a large step spends its time in
            trace_window(args.trace, *map(float, args.trace_window.split(",")))
        records = run_requests(engine, prompts, configs, guide)
        elapsed = time.perf_counter() - start
        if args.timeline:
            report_timeline(args.timeline, engine.timeline, records, prompts)
        out_tokens = sum(len(r["times"]) for r in records)
        result.update(output_tok_s=out_tokens / elapsed, req_s=len(prompts) / elapsed, seconds=elapsed)
        baseline_prompts = prompts
        print(
            f"throughput: {len(prompts)} x {shape}: {out_tokens / elapsed:.0f} "
            f"output tok/s, {len(prompts) / elapsed:.2f} req/s in {elapsed:.1f}s, "
            f"{engine.runner.mixed_steps} mixed steps"
        )
    result["compilations_after_warmup"] = engine.stats().compilations_after_warmup - compiles_before
    result.update(kv_pages=engine.num_pages, kv_tokens=engine.num_pages * engine.page_size,
                  quant_policy=args.quant_policy, weight_quant=engine.model_config.weight_quant)
    print(f"compilations after warm-up: {result['compilations_after_warmup']}")
    engine.shutdown()
    if args.baseline:
        result["baseline"] = run_baseline(args, result, baseline_prompts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def report_capacity(engine: Engine, args: argparse.Namespace) -> None:
    """The KV pages the budget (--cache-max-entry-count of what the weights leave) holds with each of
    --policies, over the same weights: each engine's cache is dropped before the next is sized."""
    weights = engine.model_config.weight_quant or engine.dtype_name
    results = []
    for policy in args.policies:
        config = dataclasses.replace(engine.engine_config, quant_policy=policy)
        params, model_config, mesh = engine.runner.params, engine.model_config, engine.mesh
        engine.runner.cache = None  # its pages go back to the allocator before the next engine is sized
        del engine
        engine = Engine(model_config, params, tokenizer=None, config=config, mesh=mesh)
        results.append({"kv_pages": engine.num_pages, "kv_tokens": engine.num_pages * engine.page_size,
                        "quant_policy": policy, "weight_quant": engine.model_config.weight_quant,
                        "weight_bytes": streamed_weight_bytes(params)})
        print(f"capacity: {engine.num_pages} KV pages of {engine.page_size} tokens "
              f"({engine.num_pages * engine.page_size} tokens), quant policy {policy}, weights {weights} "
              f"({results[-1]['weight_bytes'] / 1e9:.2f} GB)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def run_baseline(args: argparse.Namespace, result: dict, prompts: list[list[int]]) -> dict:
    """The same prompts through transformers (tools/transformers_baseline.py), against this run's figure."""
    from tools import transformers_baseline as hf

    model = hf.load_model(args.model, args.baseline_dtype)
    if args.mode == "single":
        baseline = hf.decode_rate(model, prompts[0], args.output_len, repeats=args.repeats)
        ratio = result["tok_s"] / baseline["decode_tok_s"]
    elif args.mode == "embed":
        baseline = hf.embed_throughput(model, prompts)
        ratio = result["input_tok_s"] / baseline["input_tok_s"]
        ours = [pooled(vector) for vector in result.pop("embeddings")]
        baseline["max_unit_difference"] = float(max(np.abs(a - pooled(b)).max()
                                                    for a, b in zip(ours, baseline.pop("embeddings"), strict=False)))
    else:
        baseline = hf.batch_throughput(model, prompts, args.output_len)
        ratio = result["output_tok_s"] / baseline["output_tok_s"]
    baseline.update(dtype=args.baseline_dtype, threads=hf.threads(), ratio=ratio)
    what = "forward" if args.mode == "embed" else "generate"
    print(f"transformers {what} ({args.baseline_dtype}, {baseline['threads']} threads): {hf.describe(baseline)}; "
          f"xlserve / transformers = {ratio:.2f}x")
    return baseline


if __name__ == "__main__":
    main()
