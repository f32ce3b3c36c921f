"""tools.bench_decode_formats, the GPU sweep of the decode kernel over KV page formats, on a CPU (interpret
mode, tiny shapes): every (format, tunables) row is timed and printed, so a sweep sent to a lent GPU does not
fail on what a CPU could have caught."""

from __future__ import annotations

from tools import bench_decode_formats


def test_quick_run_times_every_format_and_tunable(capsys):
    bench_decode_formats.main(["--quick", "--policies", "0,fp8", "--ppb", "1,2", "--warps", "1", "--stages", "3"])
    rows = [line.split()[:4] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [[kind, ppb, "1", "3"] for kind in ("bf16", "fp8") for ppb in "12"]
