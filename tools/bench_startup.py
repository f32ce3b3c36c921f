"""Time to ready of `xlserve serve api_server`, from the command's launch, with a timeline of its start-up.

    python -m tools.bench_startup --repeats 3 -- xlserve serve api_server MODEL --server-port 23999
    python -m tools.bench_startup --label demo --json demo.json -- xlserve serve api_server --server-port 23999

Each run launches the command, polls `GET /health` and `GET /v1/ready` on `--server-port` every 20 ms,
and notes when each of the server's start-up lines reached its stderr; then it waits until `/metrics`
reports no bucket left to compile (`xlserve:startup_buckets_remaining`, when the server has it), stops the
server with SIGTERM and prints one line per run:

    listening (the port answers), weights (the last "loaded" line), first bucket, ready (/v1/ready 200),
    all compiled (no bucket left), and the load average beside them.

`compile` mode times only the bucket programs of an engine built in this process, at several thread
counts, to show how the parallel compile scales with the cores it gets:

    python -m tools.bench_startup compile --model CKPT --threads 1 2 4 [engine options as bench_engine's]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

POLL_S = 0.02
STOP_TIMEOUT_S = 30.0


def _port(command: list[str]) -> int:
    for flag in ("--server-port",):
        if flag in command:
            return int(command[command.index(flag) + 1])
    return 23333


def _remaining(client: httpx.Client, base: str) -> int | None:
    """Buckets still compiling, from /metrics; None when the server does not say."""
    try:
        text = client.get(f"{base}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^xlserve:startup_buckets_remaining(?:\{[^}]*\})? ([\d.]+)", text, re.M)
    return int(float(match.group(1))) if match else None


def time_start(command: list[str], timeout: float) -> dict:
    """One launch of `command`: seconds from launch to each start-up milestone."""
    base = f"http://127.0.0.1:{_port(command)}"
    lines: list[tuple[float, str]] = []
    began = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               start_new_session=True)

    def read() -> None:
        for line in process.stderr:
            lines.append((time.perf_counter() - began, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    result: dict = {"load_before": os.getloadavg()[0]}
    try:
        with httpx.Client() as client:
            while time.perf_counter() - began < timeout and process.poll() is None:
                try:
                    ready = client.get(f"{base}/v1/ready", timeout=2).status_code == 200
                except httpx.HTTPError:
                    time.sleep(POLL_S)
                    continue
                result.setdefault("listening_s", time.perf_counter() - began)
                if ready:
                    result["ready_s"] = time.perf_counter() - began
                    break
                time.sleep(POLL_S)
            while "ready_s" in result and time.perf_counter() - began < timeout and process.poll() is None:
                remaining = _remaining(client, base)
                if not remaining:  # 0, or a server that does not report it: compiled everything before ready
                    result["all_compiled_s"] = time.perf_counter() - began if remaining == 0 else result["ready_s"]
                    break
                time.sleep(0.1)
    finally:
        result["load_after"] = os.getloadavg()[0]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=5)
    for at, text in lines:
        if "loaded" in text and "tensors" in text:
            result["weights_s"] = at
        elif "compiled bucket" in text or "compiled program" in text:
            result.setdefault("first_bucket_s", at)
        elif " ready after " in text:
            result["ready_line"] = text
    result["log"] = [[round(at, 3), text] for at, text in lines]  # the timeline, line by line
    if "ready_s" not in result:
        result["error"] = "\n".join(text for _, text in lines[-20:])
    return result


def describe(result: dict) -> str:
    def at(key: str) -> str:
        return f"{result[key]:.1f}" if key in result else "—"

    return (f"listening {at('listening_s')} s, weights {at('weights_s')} s, first bucket {at('first_bucket_s')} s, "
            f"ready {at('ready_s')} s, all compiled {at('all_compiled_s')} s "
            f"(load {result['load_before']:.1f} -> {result['load_after']:.1f})")


def serve_main(args: argparse.Namespace) -> dict:
    runs = []
    for i in range(args.repeats):
        result = time_start(args.command, args.timeout)
        runs.append(result)
        print(f"{args.label} run {i + 1}: {describe(result)}", flush=True)
        if "error" in result:
            print(result["error"], file=sys.stderr)
            break
    ready = sorted(r["ready_s"] for r in runs if "ready_s" in r)
    if ready:
        print(f"{args.label}: ready in {ready[0]:.1f}-{ready[-1]:.1f} s over {len(ready)} runs", flush=True)
    return {"label": args.label, "command": args.command, "runs": runs}


def compile_main(args: argparse.Namespace) -> dict:
    """Build one engine, then compile its buckets from scratch at each thread count."""
    import jax

    from serving.engine.config import EngineConfig
    from serving.engine.engine import Engine

    def buckets(text: str | None) -> tuple[int, ...] | None:
        return tuple(int(v) for v in text.split(",")) if text else None

    config = EngineConfig(session_len=args.session_len, decode_batch_buckets=buckets(args.decode_buckets),
                          prefill_row_buckets=buckets(args.prefill_rows),
                          prefill_token_buckets=buckets(args.prefill_tokens),
                          max_prefill_token_num=args.max_prefill_tokens,
                          packed_prefill_buckets=buckets(args.packed_prefill), max_batch_size=args.max_batch_size,
                          load_format=args.load_format, compilation_cache_dir="off")
    engine = Engine.from_pretrained(args.model, config)
    runs = []
    for threads in args.threads:
        jax.clear_caches()  # every round compiles from scratch
        load = os.getloadavg()[0]
        began, cpu = time.perf_counter(), time.process_time()
        engine.runner.compile_all(progress=False, threads=threads)
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        runs.append({"threads": threads, "wall_s": wall, "cpu_s": cpu, "load_before": load,
                     "programs": engine.runner.num_programs})
        print(f"{threads} threads: {engine.runner.num_programs} programs in {wall:.1f} s "
              f"({cpu:.1f} s of CPU, load {load:.1f})", flush=True)
    return {"model": args.model, "buckets": [list(s) for s in engine.buckets.shapes()], "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compile"]:
        parser = argparse.ArgumentParser(prog="bench_startup compile")
        parser.add_argument("--model", help="checkpoint folder or GGUF file (default: the demo model)")
        parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
        parser.add_argument("--session-len", type=int, default=2048)
        parser.add_argument("--load-format", default="auto")
        parser.add_argument("--max-batch-size", type=int)
        parser.add_argument("--decode-buckets")
        parser.add_argument("--prefill-rows")
        parser.add_argument("--prefill-tokens")
        parser.add_argument("--max-prefill-tokens", type=int)
        parser.add_argument("--packed-prefill")
        parser.add_argument("--json")
        args = parser.parse_args(argv[1:])
        result = compile_main(args)
    else:
        parser = argparse.ArgumentParser(prog="bench_startup", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--repeats", type=int, default=1)
        parser.add_argument("--timeout", type=float, default=600.0, help="seconds a start may take")
        parser.add_argument("--label", default="server")
        parser.add_argument("--json")
        parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the server command")
        args = parser.parse_args(argv)
        args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not args.command:
            parser.error("give the server command after --")
        result = serve_main(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
