#!/usr/bin/env bash
# Issue 20's tensor-parallel targets on a lent machine of two or four GPUs (Llama-3.1-8B shapes, random bf16
# weights): B1 at --tp 1 and --tp 2 (and 4 where there are four), B1 at --tp 2 under the small-message
# all-reduce options (XLA's one-shot all-reduce kernel; NCCL's low-latency protocol), then B3 at --tp 1 and 2,
# and a trace of the tp-2 step with its kernels listed. Targets: B1 at tp 2 >= 1.6x tp 1, B3 >= 1.8x.
# Leave NVLink multicast off as the workplace sets it (NCCL_NVLS_ENABLE=0): this script never overrides it.
#   bash tools/device_wheels.sh   # here, then on the device with carry .whl:
#   python -m pip install -q --no-deps .whl/*.whl; bash tools/gpu_tp_benchmark.sh [b1|b3|trace|all]
# Results go to $OUT (or ./out) as JSON, one file per run; a table of them is printed last.
set -uo pipefail
part=${1:-all}
out=$(mkdir -p "${OUT:-out}" && cd "${OUT:-out}" && pwd)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=$PWD
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c
source "$(dirname "$0")/gpu_workloads.sh"  # B1_ENGINE, B1, B3
bench() {  # name engine-and-bench-args...: no compilation cache, so runs under other XLA flags compile anew
  name=$1; shift
  echo "== $name (XLA_FLAGS=${XLA_FLAGS:-} NCCL_PROTO=${NCCL_PROTO:-})"
  timeout 300 python -m tools.bench_engine --shape llama3-8b --compilation-cache-dir off --json "$out/$name.json" \
    "$@" 2>&1 | grep -v -i 'warn\|delay kernel' | grep -E 'single stream|output tok/s|rror' | head -3
}
if [[ $part == b1 || $part == all ]]; then
  bench b1-tp1 --tp 1 "${B1[@]}"
  bench b1-tp2 --tp 2 "${B1[@]}"
  XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true bench b1-tp2-one-shot --tp 2 "${B1[@]}"
  NCCL_PROTO=LL bench b1-tp2-nccl-ll --tp 2 "${B1[@]}"
  if ((gpus >= 4)); then bench b1-tp4 --tp 4 "${B1[@]}"; fi
fi
if [[ $part == b3 || $part == all ]]; then
  bench b3-tp1 --tp 1 "${B3[@]}"
  bench b3-tp2 --tp 2 "${B3[@]}"
fi
if [[ $part == trace || $part == all ]]; then
  rm -rf /tmp/tp2-trace
  bench b1-tp2-trace --tp 2 "${B1_ENGINE[@]}" single --input-len 128 --output-len 256 --repeats 1 --trace /tmp/tp2-trace
  find /tmp/tp2-trace -name "*perfetto*trace.json.gz" -exec cp {} "$out/b1-tp2-trace.json.gz" \;
  python -m tools.trace_summary "$out/b1-tp2-trace.json.gz" --kernels 25 | tail -40
fi
python - "$out" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("b*-tp*.json")):
    data = json.loads(path.read_text())
    rate, unit = (data["tok_s"], "tok/s (B1)") if "tok_s" in data else (data.get("output_tok_s"), "output tok/s")
    print(f"{path.stem:20s} {rate:10.1f} {unit}")
PY
