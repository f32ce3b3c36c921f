"""Where a profiled window's GPU time went, from a JAX perfetto trace (`/start_profile` + `/stop_profile`,
or `jax.profiler.trace(..., create_perfetto_trace=True)`).

    python -m tools.trace_summary path/to/perfetto_trace.json.gz [--gaps 10] [--kernels 20]

Groups the device's kernels into program runs (consecutive kernels of one XLA module, e.g. the engine's
`step` or `sample_and_record`) and prints, per module: runs, device time per run (kernels only) and
wall time per run (first kernel start to last kernel end); then how much of the window the device was
idle between kernels, and the longest idle gaps with the programs on either side. Idle time is what the
host costs a serving run: the program times are what the kernels cost. `--kernels N` then lists the busiest
program's N dearest kernels per run (a decode step's GEMMs against its small kernels).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass
class Kernel:
    start: float  # us
    end: float
    module: str
    name: str


NO_MODULE = "?"  # a device event that names no XLA module: the host's copies to and from the device


def module_of(event: dict) -> str:
    """The XLA module a device event belongs to (JAX names it in the event's args)."""
    args = event.get("args") or {}
    for key in ("hlo_module", "module", "long_name"):
        if key in args:
            value = str(args[key])
            return value.split("(")[0] if key != "long_name" else value.split(":")[0]
    return NO_MODULE


def load_kernels(path: str) -> tuple[list[Kernel], dict[int, str]]:
    """The device's complete events, sorted by start, and the trace's process names."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in processes.items() if "gpu" in name.lower() or "device" in name.lower()}
    kernels = [Kernel(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), module_of(e), e.get("name", ""))
               for e in events if e.get("ph") == "X" and e.get("pid") in devices]
    kernels.sort(key=lambda k: k.start)
    return kernels, processes


def program_runs(kernels: list[Kernel]) -> list[tuple[str, float, float, float]]:
    """(module, start, end, busy us) per run of consecutive kernels of one module. Events of no module (the
    host's copies to and from the device, which overlap a program on their own stream) do not split a run."""
    runs: list[list] = []
    for k in (k for k in kernels if k.module != NO_MODULE):
        if runs and runs[-1][0] == k.module:
            run = runs[-1]
            run[3] += max(0.0, k.end - max(k.start, run[2]))  # overlapping streams count once
            run[2] = max(run[2], k.end)
        else:
            runs.append([k.module, k.start, k.end, k.end - k.start])
    return [tuple(r) for r in runs]


def kernel_table(kernels: list[Kernel], module: str, runs: int) -> list[tuple[str, float, float, float]]:
    """(kernel name, us per run, calls per run, us per call) of `module`'s kernels over its `runs` runs, dearest
    first: where one program's time goes, e.g. a decode step's GEMMs against its small kernels."""
    busy: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for k in kernels:
        if k.module == module:
            busy[k.name] += k.end - k.start
            calls[k.name] += 1
    return sorted(((name, busy[name] / runs, calls[name] / runs, busy[name] / calls[name]) for name in busy),
                  key=lambda row: -row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--gaps", type=int, default=10, help="how many of the longest idle gaps to list")
    parser.add_argument("--kernels", type=int, default=0, help="list the busiest module's N dearest kernels per run")
    args = parser.parse_args()
    kernels, processes = load_kernels(args.trace)
    if not kernels:
        print("no device events; processes:", processes)
        return
    if all(k.module == NO_MODULE for k in kernels):  # a trace format this reader does not know: show it
        print("no module names in the device events' args; e.g.", kernels[:3])
    runs = program_runs(kernels)
    window = kernels[-1].end - kernels[0].start
    busy = sum(r[3] for r in runs)
    print(f"window {window / 1e3:.1f} ms, {len(kernels)} kernels, {len(runs)} program runs, device busy "
          f"{busy / 1e3:.1f} ms ({busy / window:.0%}), idle {(window - busy) / 1e3:.1f} ms")
    by_module: dict[str, list] = defaultdict(list)
    for module, start, end, run_busy in runs:
        by_module[module].append((end - start, run_busy))
    print("| module | runs | busy ms/run (median, p90) | wall ms/run (median) | busy ms total |")
    print("| --- | ---: | --- | ---: | ---: |")
    for module, values in sorted(by_module.items(), key=lambda kv: -sum(v[1] for v in kv[1])):
        walls, busys = np.array([v[0] for v in values]) / 1e3, np.array([v[1] for v in values]) / 1e3
        print(f"| {module[:60]} | {len(values)} | {np.median(busys):.2f}, {np.percentile(busys, 90):.2f} | "
              f"{np.median(walls):.2f} | {busys.sum():.1f} |")
    gaps = [(runs[i + 1][1] - runs[i][2], runs[i][0], runs[i + 1][0]) for i in range(len(runs) - 1)]
    gap_us = np.array([g[0] for g in gaps]) if gaps else np.zeros(1)
    print(f"idle gaps between runs: total {gap_us.clip(0).sum() / 1e3:.1f} ms, median {np.median(gap_us):.0f} us, "
          f"p90 {np.percentile(gap_us, 90):.0f} us, over 1 ms: {(gap_us > 1e3).sum()}")
    for gap, before, after in sorted(gaps, reverse=True)[: args.gaps]:
        print(f"  {gap / 1e3:.2f} ms idle after {before[:50]} before {after[:50]}")
    if args.kernels:
        module = max(by_module, key=lambda m: sum(v[1] for v in by_module[m]))
        print(f"| {module[:40]}: kernel | us per run | calls per run | us per call |")
        print("| --- | ---: | ---: | ---: |")
        for name, per_run, calls, per_call in kernel_table(kernels, module, len(by_module[module]))[: args.kernels]:
            print(f"| {name[:70]} | {per_run:.1f} | {calls:.2f} | {per_call:.2f} |")


if __name__ == "__main__":
    main()
