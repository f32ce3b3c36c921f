"""tools.trace_summary over a small perfetto trace in the profiler's format (a device process, kernels named by
their XLA module in each event's args)."""

from __future__ import annotations

import gzip
import json

from tools.trace_summary import kernel_table, load_kernels, program_runs


def write_trace(path, kernels: list[tuple[str | None, str, float, float]]) -> str:
    """A gzipped perfetto trace of device kernels (module or None for a copy, name, start us, duration us)."""
    events = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "python"}},
              {"ph": "X", "pid": 1, "tid": 1, "name": "host work", "ts": 0, "dur": 500}]  # not a device event
    for module, name, start, duration in kernels:
        args = {"hlo_module": module} if module else {}
        events.append({"ph": "X", "pid": 7, "tid": 2, "name": name, "ts": start, "dur": duration, "args": args})
    file = path / "perfetto_trace.json.gz"
    with gzip.open(file, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(file)


def test_copies_do_not_split_a_program_and_its_kernels_are_counted_per_run(tmp_path):
    """Two decode steps, each interrupted by a host-to-device copy (as the next step's inputs arrive), with a
    sampler between them: two runs of the step, not four, and its kernels per run."""
    step = [("jit_step", "gemm", 0, 70), (None, "MemcpyH2D", 71, 1), ("jit_step", "norm", 72, 2),
            ("jit_step", "gemm", 74, 70)]
    kernels = [*step, ("jit_sample", "argmax", 150, 5), *[(m, n, s + 160, d) for m, n, s, d in step]]
    found, processes = load_kernels(write_trace(tmp_path, kernels))
    assert len(found) == 9 and set(processes.values()) == {"/device:GPU:0", "python"}
    runs = program_runs(found)
    assert [(module, start, end, busy) for module, start, end, busy in runs] == [
        ("jit_step", 0, 144, 142), ("jit_sample", 150, 155, 5), ("jit_step", 160, 304, 142)]
    assert kernel_table(found, "jit_step", 2) == [("gemm", 140.0, 2.0, 70.0), ("norm", 2.0, 1.0, 2.0)]
