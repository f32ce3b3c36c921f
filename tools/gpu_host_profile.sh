#!/usr/bin/env bash
# The engine loop's host work on the GPU machine, from a py-spy profile of fp8 B3 (issue 20/21): at 256 rows
# the turns are host-bound there (the host waits 0.3-1.7 ms of 12.8-14.7 ms turns; docs/perf-notes.md, tenth
# session). PYSPY_ARGS=--native adds the C++ frames. `bash tools/device_wheels.sh` puts py-spy's wheel in .whl/; results: $OUT/host.txt (py-spy raw),
# $OUT/summary.txt (`tools.host_profile`), $OUT/tl.json (the per-turn timeline).
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
py-spy record -r 250 -f raw ${PYSPY_ARGS:-} -o "$out/host.txt" --subprocesses -- timeout ${LIMIT:-110} python -m tools.bench_engine \
  --shape llama3-8b --attention-backend pallas --weight-quant fp8 --session-len 1024 --decode-buckets 128,256 \
  --prefill-rows 8,16,32 --prefill-tokens 256 --max-prefill-tokens 8192 throughput --num-prompts 1000 \
  --input-len 256 --output-len 256 --timeline "$out/tl.json" 2>&1 | grep -v -i "warn\|cuda_timer" | tail -14
python -m tools.host_profile "$out/host.txt" --top 40 | tee "$out/summary.txt"
