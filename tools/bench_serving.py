"""HTTP load generator for any OpenAI-compatible server, after vLLM's `vllm bench serve` and SGLang's
`bench_serving` (methodology: ../shared/docs/reference/performance-anchors.md §3).

    python -m tools.bench_serving --base-url http://127.0.0.1:23333 --dataset sharegpt-like \\
        --num-prompts 1000 --request-rate inf --ignore-eos --result-json b2.json --plot b2.png
    python -m tools.bench_serving --dataset random --input-len 1024 --output-len 1024 --max-concurrency 64
    python -m tools.bench_serving --dataset shared-prefix --prefix-len 1024 --prompts-per-group 16 ...
    python -m tools.bench_serving --dataset sharegpt-like --max-concurrency 1 8 64 256 --plot sweep.png
    python -m tools.bench_serving --num-prompts 16 --input-len 64 --output-len 128 --ignore-eos \
        --vocab-size 49152 --baseline transformers --baseline-model SmolLM2-135M-Instruct.Q4_1.gguf

`--baseline transformers` then generates the same prompts with transformers in this process, as one static
batch of `--num-prompts` (tools/transformers_baseline.py: `--baseline-model`, the checkpoint the server
serves, loaded by transformers itself), while the server idles, and reports the output throughput ratio.

Prompts are generated offline, with no tokenizer on either side: `/v1/completions` gets token-id
lists drawn from [100, --vocab-size), so prompt lengths are exact. `/v1/chat/completions` gets text
made of the same ids mapped to common English words (about one token each plus the chat template's
tokens), so its prompt lengths are approximate; input token counts come from the server's `usage`
where it sends one.

Metrics follow vLLM's definitions (vllm/benchmarks/serve.py, `calculate_metrics`):
- request throughput = completed requests / duration; output (total) token throughput = output
  (input + output) tokens of completed requests / duration. Duration runs from the first request
  sent to the last one finished. Output tokens come from `usage.completion_tokens` (we always ask
  with `stream_options.include_usage`); a server that sends none gets its text chunks counted.
- TTFT: request sent to first chunk with content. E2E latency: request sent to the last chunk
  with content. TPOT per request: (E2E - TTFT) / (output tokens - 1), for requests with more than
  one output token. ITL: every gap between consecutive content chunks, pooled over all requests.
- Peak output tok/s: the most output tokens in any one-second bin (a request's tokens spread over
  its chunks); peak concurrency: the most requests in flight at once.
Failed requests (HTTP errors, error events, timeouts, no content) are counted, not fatal.

The generator itself must not be the bottleneck: it reports its own CPU time (`client_cpu_s`) and
warns above 80% of a core. One process streams about 20k chunks/s on a laptop-class core; to
keep it there, requests spread over several httpx clients (`CONNECTIONS_PER_CLIENT`) and SSE lines
are split from raw bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from serving.client import LineSplitter

# Token ids below this are left out: tokenizers put their special and byte tokens there.
MIN_TOKEN_ID = 100
# Common one-token English words for the chat endpoint, where prompts must be text.
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part"
).split()

# ShareGPT-like lengths: log-normal prompt and output lengths, kept only when they pass vLLM's
# ShareGPT filter (drop prompt or output < 4 tokens, prompt > 1024, prompt + output > 2048;
# vllm/benchmarks/datasets.py, `is_valid_sequence`). The medians and spreads are our fit, chosen so
# the filtered means match vLLM's published run on 1000 ShareGPT_V3 prompts with Llama-3.1-8B
# (vllm PR #18566: 229,711 input tokens through the chat template, about 30 of them per prompt, and
# 203,068 output tokens): over 100k draws, prompts have mean 196 / median 129 / p99 895 tokens and
# outputs mean 197 / median 130 / p99 1076, with the long right tails of real conversations.
SHAREGPT_PROMPT = (math.log(135.0), 1.1)  # (mu, sigma) of ln(prompt tokens)
SHAREGPT_OUTPUT = (math.log(130.0), 0.95)  # (mu, sigma) of ln(output tokens)
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
# Streams per httpx client (see `benchmark`).
CONNECTIONS_PER_CLIENT = 32
# Above this share of one core the generator warns that it may be what limits the result.
LOADGEN_BUSY = 0.8


@dataclass
class BenchRequest:
    prompt: list[int]  # token ids (mapped to words for the chat endpoint)
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = "not sent: the run hit --max-duration"
    start: float = 0.0  # seconds after the benchmark started, when the request was sent
    ttft: float = 0.0
    latency: float = 0.0  # E2E: sent to last content chunk
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0  # server's usage when sent, else the planned length
    output_tokens: int = 0  # server's usage when sent, else content chunks
    usage: bool = False  # whether the counts came from the server's usage
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache (usage.prompt_tokens_details)


# ---------------------------------------------------------------- datasets


def _lengths(rng: np.random.Generator, length: int, range_ratio: float, count: int) -> np.ndarray:
    """vLLM's `random` lengths: uniform integers in [L(1-r), L(1+r)], at least 1."""
    low, high = int(length * (1 - range_ratio)), int(length * (1 + range_ratio))
    return np.maximum(rng.integers(low, high + 1, size=count), 1)


def _ids(rng: np.random.Generator, vocab_size: int, count: int) -> list[int]:
    return rng.integers(MIN_TOKEN_ID, vocab_size, size=count).tolist()


def random_dataset(
    num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int
) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    inputs, outputs = _lengths(rng, input_len, range_ratio, num), _lengths(rng, output_len, range_ratio, num)
    return [BenchRequest(_ids(rng, vocab_size, int(n)), int(m)) for n, m in zip(inputs, outputs, strict=True)]


def sharegpt_like_dataset(num: int, vocab_size: int, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    requests: list[BenchRequest] = []
    while len(requests) < num:  # rejection keeps exactly the pairs vLLM's filter would keep
        n = int(round(rng.lognormal(*SHAREGPT_PROMPT)))
        m = int(round(rng.lognormal(*SHAREGPT_OUTPUT)))
        if min(n, m) >= SHAREGPT_MIN_LEN and n <= SHAREGPT_MAX_PROMPT and n + m <= SHAREGPT_MAX_TOTAL:
            requests.append(BenchRequest(_ids(rng, vocab_size, n), m))
    return requests


def shared_prefix_dataset(
    num: int,
    prefix_len: int,
    prompts_per_group: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """SGLang's generated-shared-prefix: groups of prompts that start with the group's own system
    prompt (`prefix_len` tokens) and go on with a question of `input_len` tokens; shuffled so
    groups interleave as they would in traffic."""
    rng = np.random.default_rng(seed)
    questions, outputs = _lengths(rng, input_len, range_ratio, num), _lengths(rng, output_len, range_ratio, num)
    requests = []
    for i in range(num):
        if i % prompts_per_group == 0:
            prefix = _ids(rng, vocab_size, prefix_len)
        requests.append(BenchRequest(prefix + _ids(rng, vocab_size, int(questions[i])), int(outputs[i])))
    return [requests[i] for i in rng.permutation(num)]


def as_text(ids: list[int]) -> str:
    """A chat prompt of about len(ids) tokens; equal ids give equal text, so shared prefixes stay shared."""
    return " ".join(WORDS[i % len(WORDS)] for i in ids)


def arrival_offsets(num: int, request_rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s after start): gamma-distributed gaps with mean 1/rate (burstiness 1 = Poisson),
    as vLLM; all at 0 for an infinite rate. Absolute offsets keep sleeps from drifting."""
    if math.isinf(request_rate):
        return np.zeros(num)
    gaps = np.random.default_rng([seed, 1]).gamma(burstiness, 1 / (request_rate * burstiness), size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps)


# ---------------------------------------------------------------- client


def payload(args: argparse.Namespace, model: str, request: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": as_text(request.prompt)}]
    else:
        body["prompt"] = request.prompt
    return body


class SSEParser:
    """Incremental server-sent events: feed lines, get each event's data (multi-line data joined by
    newlines) at the blank line that ends it. Comments (`:`) and other fields are ignored."""

    def __init__(self) -> None:
        self.data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            event = "\n".join(self.data) if self.data else None
            self.data = []
            return event
        if line.startswith("data:"):
            value = line[5:]
            self.data.append(value[1:] if value.startswith(" ") else value)
        return None


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of a streamed body, split at "\n" only (`serving.client.LineSplitter` says why): httpx's
    `aiter_lines` broke a few events per thousand in two."""
    splitter = LineSplitter()
    async for data in response.aiter_bytes():
        for line in splitter.feed(data):
            yield line
    for line in splitter.end():
        yield line


def chunk_content(chunk: dict[str, Any]) -> tuple[bool, str]:
    """(has a choice that counts as output, its text). Chunks with a finish reason count even when
    empty, as vLLM counts every completion chunk; empty role-only chat chunks do not."""
    choices = chunk.get("choices") or []
    if not choices:
        return False, ""
    choice = choices[0]
    delta = choice.get("delta") or {}
    text = choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
    return bool(text or choice.get("finish_reason")), text


class Runner:
    def __init__(self, args: argparse.Namespace, clients: list[httpx.AsyncClient], model: str):
        self.args, self.clients, self.model = args, clients, model
        self.in_flight = self.peak_in_flight = 0
        self.start = 0.0

    async def send(self, request: BenchRequest, result: RequestResult, client: httpx.AsyncClient) -> None:
        """One streamed request; fills `result`, catching everything but cancellation."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        sent = time.perf_counter()
        result.start, result.error = sent - self.start, "cancelled: the run hit --max-duration"
        result.prompt_tokens = len(request.prompt)
        chunks, last = 0, sent

        def on_event(data: str) -> None:
            nonlocal chunks, last
            if data.strip() == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {str(chunk['error'])[:200]}")
            counts, text = chunk_content(chunk)
            if counts:
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
                if not result.usage:  # counted text chunks stand in until the server's usage arrives
                    result.output_tokens += bool(text)
            if usage := chunk.get("usage"):
                result.output_tokens = usage.get("completion_tokens", 0)
                result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                result.usage = True

        try:
            async with asyncio.timeout(self.args.request_timeout):
                url = self.args.base_url + self.args.endpoint
                async with client.stream("POST", url, json=payload(self.args, self.model, request)) as response:
                    if response.status_code != 200:
                        body = (await response.aread()).decode(errors="replace")
                        raise RuntimeError(f"HTTP {response.status_code}: {body[:200]}")
                    parser = SSEParser()
                    async for line in sse_lines(response):
                        if (event := parser.feed(line)) is not None:
                            on_event(event)
                    if (event := parser.feed("")) is not None:  # a last event without its blank line
                        on_event(event)
            if chunks == 0:
                raise RuntimeError("no content chunk arrived")
            result.latency, result.success, result.error = last - sent, True, ""
        except TimeoutError:
            result.error = f"timeout after {self.args.request_timeout}s"
        except Exception as error:  # any failure of one request (bad status, bad JSON, a reset) is counted, not fatal
            result.error = f"{type(error).__name__}: {error}"[:300]
        finally:
            self.in_flight -= 1

    async def run(self, requests: list[BenchRequest], offsets: np.ndarray) -> tuple[list[RequestResult], float]:
        results = [RequestResult() for _ in requests]
        limit = asyncio.Semaphore(self.args.max_concurrency or len(requests))

        async def limited(i: int) -> None:
            async with limit:
                await self.send(requests[i], results[i], self.clients[i % len(self.clients)])

        tasks: list[asyncio.Task] = []

        async def dispatch() -> None:
            for i, offset in enumerate(offsets):
                delay = self.start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(limited(i)))
            await asyncio.gather(*tasks)

        self.start = time.perf_counter()
        try:
            async with asyncio.timeout(self.args.max_duration):
                await dispatch()
        except TimeoutError:  # gather was cancelled with its tasks; their results say so
            await asyncio.gather(*tasks, return_exceptions=True)
        return results, time.perf_counter() - self.start


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    response = await client.get(f"{base_url}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def benchmark(
    args: argparse.Namespace, requests: list[BenchRequest], offsets: np.ndarray
) -> tuple[list[RequestResult], float, int, str, float]:
    concurrency = min(args.max_concurrency or len(requests), len(requests))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with contextlib.AsyncExitStack() as stack:
        # Several clients, each holding a share of the connections: httpcore's pool scans all its
        # connections on every request and every response close, which made one client of 1000
        # connections spend 60% of the generator's CPU time in that bookkeeping.
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    # Each may open them all, so how requests spread over clients never queues one.
                    limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
                    timeout=httpx.Timeout(args.request_timeout, pool=None),  # waiting for a connection is queueing
                    headers=headers,
                    trust_env=False,  # never route through a proxy from the environment: only the URL given
                )
            )
            for _ in range(math.ceil(concurrency / CONNECTIONS_PER_CLIENT))
        ]
        model = args.model or await first_model(clients[0], args.base_url)
        runner = Runner(args, clients, model)
        if args.num_warmups:  # compile and cache warm-up outside the measured window
            warm = [RequestResult() for _ in range(args.num_warmups)]
            await asyncio.gather(
                *(runner.send(requests[i % len(requests)], r, clients[i % len(clients)]) for i, r in enumerate(warm))
            )
            for r in warm:
                if not r.success:
                    print(f"warning: a warm-up request failed: {r.error}", file=sys.stderr)
            runner.peak_in_flight = 0
        cpu = time.process_time()
        results, duration = await runner.run(requests, offsets)
        return results, duration, runner.peak_in_flight, model, time.process_time() - cpu


# ---------------------------------------------------------------- metrics


def summarize(values: list[float], percentiles: list[float]) -> dict[str, float | None]:
    """mean, median and percentiles in milliseconds (None when there are no values)."""
    ms = np.asarray(values, dtype=float) * 1e3
    stats: dict[str, float | None] = {"mean": None, "median": None} | {f"p{p:g}": None for p in percentiles}
    if ms.size:
        stats.update(mean=float(ms.mean()), median=float(np.median(ms)))
        stats.update({f"p{p:g}": float(np.percentile(ms, p)) for p in percentiles})
    return stats


def output_timeline(results: list[RequestResult]) -> np.ndarray:
    """Output tokens per one-second bin from the start; a request's tokens are spread evenly over
    its content chunks (usage gives totals, not per-chunk counts)."""
    times, weights = [], []
    for r in results:
        if r.success:
            stamps = r.start + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
            times.append(stamps)
            weights.append(np.full(stamps.size, r.output_tokens / stamps.size))
    if not times:
        return np.zeros(0)
    stamps, counts = np.concatenate(times), np.concatenate(weights)
    return np.bincount(stamps.astype(int), weights=counts)


def compute_metrics(
    results: list[RequestResult], duration: float, percentiles: list[float], peak_concurrency: int
) -> dict[str, Any]:
    done = [r for r in results if r.success]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    timeline = output_timeline(results)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": dict(Counter(r.error for r in results if not r.success).most_common()),
        "usage_reported": sum(r.usage for r in done),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "cached_input_tokens": sum(r.cached_tokens for r in done),
        "prefix_cache_hit_rate": sum(r.cached_tokens for r in done) / total_in if total_in else 0.0,
        "request_throughput": len(done) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "peak_output_throughput": float(timeline.max()) if timeline.size else 0.0,
        "peak_concurrency": peak_concurrency,
        "ttft_ms": summarize([r.ttft for r in done], percentiles),
        "tpot_ms": summarize(tpots, percentiles),
        "itl_ms": summarize([gap for r in done for gap in r.itl], percentiles),
        "e2el_ms": summarize([r.latency for r in done], percentiles),
    }


def speedup(metrics: dict[str, Any], baseline_json: str) -> dict[str, Any]:
    """This run against a saved one: output throughput ratio, and how many times shorter the median TTFT is."""
    with open(baseline_json) as f:
        base = json.load(f)["metrics"]
    ttft, base_ttft = metrics["ttft_ms"]["median"], base["ttft_ms"]["median"]
    return {
        "baseline": baseline_json,
        "output_throughput": metrics["output_throughput"] / base["output_throughput"],
        "ttft_median": base_ttft / ttft if ttft and base_ttft else None,
    }


def table(metrics: dict[str, Any], header: str) -> str:
    lines = [
        f"{' Serving Benchmark Result ':=^72}",
        header,
        f"requests: {metrics['completed']} completed, {metrics['failed']} failed; "
        f"duration {metrics['duration_s']:.2f} s; peak concurrency {metrics['peak_concurrency']}",
        f"tokens: {metrics['total_input_tokens']} in ({metrics['prefix_cache_hit_rate']:.1%} from the prefix "
        f"cache), {metrics['total_output_tokens']} out (usage from the server for "
        f"{metrics['usage_reported']}/{metrics['completed']})",
        f"throughput: {metrics['request_throughput']:.2f} req/s, {metrics['output_throughput']:.1f} output "
        f"tok/s (peak 1 s bin {metrics['peak_output_throughput']:.0f}), {metrics['total_token_throughput']:.1f} "
        "total tok/s",
    ]
    columns = list(metrics["ttft_ms"])
    lines.append(f"{'ms':<6}" + "".join(f"{c:>11}" for c in columns))
    for name in ("ttft", "tpot", "itl", "e2el"):
        stats = metrics[f"{name}_ms"]
        lines.append(f"{name.upper():<6}" + "".join(f"{'-' if v is None else f'{v:.2f}':>11}" for v in stats.values()))
    errors = metrics["errors"]
    for error, count in list(errors.items())[:3]:  # the JSON has them all
        lines.append(f"failed x{count}: {error[:110]}")
    if len(errors) > 3:
        lines.append(f"... {len(errors) - 3} more distinct errors in --result-json")
    if "speedup" in metrics:
        speedup = metrics["speedup"]
        ttft = "-" if speedup["ttft_median"] is None else f"x{speedup['ttft_median']:.2f}"
        lines.append(f"vs baseline {speedup['baseline']}: output throughput x{speedup['output_throughput']:.2f}, "
                     f"median TTFT {ttft} shorter")
    if "transformers" in metrics:
        base = metrics["transformers"]
        lines.append(f"transformers generate, one static batch ({base['dtype']}, {base['threads']} threads): "
                     f"{base['output_tok_s']:.1f} output tok/s in {base['seconds']:.1f} s; "
                     f"this server x{base['ratio']:.2f}")
    if "client_cpu_s" in metrics:  # a load generator that keeps a core busy measures itself, not the server
        busy = metrics["client_cpu_s"] / metrics["duration_s"]
        warning = " - near saturation: it may limit the result" if busy > LOADGEN_BUSY else ""
        lines.append(f"load generator: {metrics['client_cpu_s']:.1f} s CPU, {busy:.0%} of one core{warning}")
    lines.append("=" * 72)
    return "\n".join(lines)


def plot(results: list[RequestResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    done = [r for r in results if r.success]
    series = {
        "TTFT (ms)": [r.ttft * 1e3 for r in done],
        "TPOT (ms)": [(r.latency - r.ttft) / (r.output_tokens - 1) * 1e3 for r in done if r.output_tokens > 1],
        "ITL (ms)": [gap * 1e3 for r in done for gap in r.itl],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, values) in zip(axes.flat, series.items(), strict=False):
        if values:
            ax.hist(values, bins=50)
        ax.set_xlabel(name)
        ax.set_ylabel("count")
    timeline = output_timeline(results)
    ax = axes.flat[3]
    ax.plot(np.arange(timeline.size) + 0.5, timeline)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tok/s (1 s bins)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def transformers_baseline(args: argparse.Namespace, requests: list[BenchRequest], metrics: dict[str, Any]) -> dict:
    """The same prompts through transformers' `generate` as one static batch, against this run's output tok/s."""
    from tools import transformers_baseline as hf

    model = hf.load_model(args.baseline_model, args.baseline_dtype)
    baseline = hf.batch_throughput(model, [r.prompt for r in requests], args.output_len)
    baseline.update(dtype=args.baseline_dtype, threads=hf.threads(),
                    ratio=metrics["output_throughput"] / baseline["output_tok_s"])
    return baseline


def plot_sweep(reports: list[dict[str, Any]], swept: str, path: str) -> None:
    """One figure: output throughput, TTFT and TPOT percentiles, each against the load level of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Levels as evenly spaced categories: a rate sweep may end at inf, which no numeric axis holds.
    levels = [_level_label(report["config"][swept]) for report in reports]
    x = np.arange(len(reports))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    throughput = axes[0]
    throughput.plot(x, [r["metrics"]["output_throughput"] for r in reports], marker="o", label="output tok/s")
    throughput.set_ylabel("output tok/s")
    requests = throughput.twinx()
    requests.plot(x, [r["metrics"]["request_throughput"] for r in reports], marker="s", linestyle="--",
                  color="tab:green", label="req/s")
    requests.set_ylabel("req/s")
    throughput.set_title("throughput")
    throughput.legend(handles=[*throughput.get_lines(), *requests.get_lines()], fontsize=8)
    for ax, name in ((axes[1], "ttft"), (axes[2], "tpot")):
        for stat in reports[0]["metrics"][f"{name}_ms"]:
            values = [r["metrics"][f"{name}_ms"][stat] for r in reports]
            ax.plot(x, [math.nan if v is None else v for v in values], marker="o", label=stat)
        ax.set_ylabel("ms")
        ax.set_title(name.upper())
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, levels)
        ax.set_xlabel("max concurrency" if swept == "max_concurrency" else "request rate (req/s)")
    config = reports[0]["config"]
    fig.suptitle(f"{config['model']} at {config['base_url']}{config['endpoint']}; {config['dataset']} "
                 f"x{config['num_prompts']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _level_label(value: Any) -> str:
    return "-" if value is None else str(value)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:23333", help="the server, without /v1")
    parser.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    parser.add_argument("--model", help="the model to ask for (default: the first of /v1/models)")
    parser.add_argument("--api-key", help="sent as a Bearer token")
    parser.add_argument("--dataset", default="random", choices=["random", "sharegpt-like", "shared-prefix"])
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=1024, help="random: prompt; shared-prefix: question")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [L(1-r), L(1+r)]; 0 = fixed (vLLM's --random-range-ratio)",
    )
    parser.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    parser.add_argument("--prompts-per-group", type=int, default=16, help="shared-prefix: prompts per prefix")
    parser.add_argument("--vocab-size", type=int, default=32000, help=f"prompt ids are drawn from [{MIN_TOKEN_ID}, V)")
    parser.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                        help="requests/s (Poisson); inf = all at once. Several values: a sweep, one run each")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    parser.add_argument("--max-concurrency", type=int, nargs="+", default=[None],
                        help="at most this many requests in flight. Several values: a sweep, one run each")
    parser.add_argument("--num-warmups", type=int, default=0, help="requests sent and discarded before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens (ignore_eos: true)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--percentiles", default="90,99", help="comma-separated, reported beside mean and median")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-duration", type=float, default=3600.0, help="seconds for the whole run")
    parser.add_argument("--result-json", help="write config and metrics here")
    parser.add_argument("--save-detail", action="store_true", help="add per-request arrays to the JSON")
    parser.add_argument("--plot", help="PNG of the TTFT/TPOT/ITL distributions and throughput over time; in a "
                        "sweep, of throughput and TTFT/TPOT percentiles against the load")
    parser.add_argument("--baseline", choices=["transformers"],
                        help="also generate the prompts with transformers as one static batch (--baseline-model)")
    parser.add_argument("--baseline-model", help="--baseline: the served checkpoint (folder or .gguf file)")
    parser.add_argument("--baseline-dtype", default="float32", help="--baseline: transformers' dtype")
    parser.add_argument(
        "--baseline-json",
        help="a --result-json of an earlier run (e.g. the same workload with --no-enable-prefix-caching): "
        "report this run's speedup over it",
    )
    args = parser.parse_args(argv)
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    for name in ("num_prompts", "vocab_size", "input_len", "output_len", "prompts_per_group"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.vocab_size <= MIN_TOKEN_ID:
        parser.error(f"--vocab-size must exceed {MIN_TOKEN_ID}")
    if not 0 <= args.range_ratio < 1:
        parser.error("--range-ratio must be in [0, 1)")
    if min(args.request_rate) <= 0 or args.burstiness <= 0:
        parser.error("--request-rate and --burstiness must be positive")
    if args.baseline and (not args.baseline_model or args.dataset != "random" or args.range_ratio
                          or args.endpoint != "/v1/completions"):
        parser.error("--baseline needs --baseline-model and fixed-length random prompts to /v1/completions")
    if any(c is not None and c < 1 for c in args.max_concurrency):
        parser.error("--max-concurrency must be positive")
    if len(args.request_rate) > 1 and len(args.max_concurrency) > 1:
        parser.error("sweep one of --request-rate and --max-concurrency; give the other one value")
    # One run per load level: the swept option and its values (a single run is a sweep of one level).
    args.sweep = "max_concurrency" if len(args.max_concurrency) > 1 else "request_rate"
    args.levels = getattr(args, args.sweep)
    args.request_rate, args.max_concurrency = args.request_rate[0], args.max_concurrency[0]
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # before the run, not after it
            parser.error("--plot needs matplotlib: pip install -e '.[bench]'")
    args.percentiles = [float(p) for p in args.percentiles.split(",") if p]
    return args


def make_dataset(args: argparse.Namespace) -> list[BenchRequest]:
    if args.dataset == "sharegpt-like":
        return sharegpt_like_dataset(args.num_prompts, args.vocab_size, args.seed)
    if args.dataset == "shared-prefix":
        return shared_prefix_dataset(
            args.num_prompts,
            args.prefix_len,
            args.prompts_per_group,
            args.input_len,
            args.output_len,
            args.range_ratio,
            args.vocab_size,
            args.seed,
        )
    return random_dataset(
        args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.vocab_size, args.seed
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """One run, or with several --request-rate or --max-concurrency values a sweep: one run per value, each
    with its table; the JSON then holds every run's report under `sweep`, and the plot the load curves."""
    args = parse_args(argv)
    if len(args.levels) == 1:
        return run(args)
    reports = [run(argparse.Namespace(**{**vars(args), args.sweep: level, "result_json": None, "plot": None}))
               for level in args.levels]
    sweep = {"swept": args.sweep, "levels": [str(level) for level in args.levels], "sweep": reports}
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(sweep, f, indent=2)
    if args.plot:
        plot_sweep(reports, args.sweep, args.plot)
    return sweep


def run(args: argparse.Namespace) -> dict[str, Any]:
    requests = make_dataset(args)
    offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness, args.seed)
    results, duration, peak, model, cpu = asyncio.run(benchmark(args, requests, offsets))
    metrics = compute_metrics(results, duration, args.percentiles, peak)
    metrics["client_cpu_s"] = cpu
    # Keys stay out of result files; the sweep's levels are in the sweep's own JSON (inf is no JSON number).
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "levels")}
    config.update(
        model=model,
        request_rate=str(args.request_rate),
        date=datetime.now(UTC).isoformat(),
        planned_input_tokens=sum(len(r.prompt) for r in requests),
        planned_output_tokens=sum(r.output_len for r in requests),
    )
    if args.baseline_json:
        metrics["speedup"] = speedup(metrics, args.baseline_json)
    if args.baseline:
        metrics["transformers"] = transformers_baseline(args, requests, metrics)
    header = (
        f"{model} at {args.base_url}{args.endpoint}; {args.dataset} x{len(requests)}; rate "
        f"{args.request_rate:g}/s, max concurrency {args.max_concurrency or '-'}; ignore_eos {args.ignore_eos}"
    )
    print(table(metrics, header))
    report: dict[str, Any] = {"config": config, "metrics": metrics}
    if args.save_detail:
        report["detail"] = [
            asdict(r) | {"planned_output_len": q.output_len} for r, q in zip(results, requests, strict=True)
        ]
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(results, args.plot, header)
    return report


if __name__ == "__main__":
    main()
