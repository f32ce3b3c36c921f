#!/usr/bin/env bash
# The latency figure of issue 20: Poisson arrivals of the ShareGPT-like set through HTTP at fixed rates,
# each rate with its own prompts (a new --seed: a repeated prompt would be served by the prefix cache),
# one server with B2's flags (tools/gpu_serving_benchmark.sh). Targets: p50 TPOT <= 8 ms and p99 TTFT
# <= 150 ms at 16 req/s for 2 minutes; the highest rate that still meets both.
#   MODEL=.bench/llama3-8b-v32k RATES="16:120 24:60 32:60" bash tools/gpu_latency_benchmark.sh
# RATES: rate:seconds pairs; each run sends rate x seconds requests. Results: $OUT/latency-<rate>.json.
set -uo pipefail
model=${MODEL:?set MODEL to a folder with config.json and tokenizer files}
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
source "$(dirname "$0")/gpu_server.sh"
start_server "$out/server.log" --session-len 2048 --max-batch-size ${MAX_BATCH:-512} \
  --decode-batch-buckets ${DECODE_BUCKETS:-1 2 4 8 16 32 64 128 256 512} \
  --prefill-row-buckets ${PREFILL_ROWS:-1 2 3 4 6 8 12 16 24 32 48 64} --prefill-token-buckets 128 \
  --max-prefill-token-num 8192 --packed-prefill-buckets ${PACKED:-128 256 512 1024 2048 4096 8192} \
  ${SERVER_FLAGS:-} || exit 1
seed=1
for pair in ${RATES:-16:120 24:60 32:60}; do
  rate=${pair%%:*}; seconds=${pair##*:}
  python -m tools.bench_serving --base-url http://127.0.0.1:23333 --dataset sharegpt-like --seed $seed \
    --num-prompts $((rate * seconds)) --request-rate "$rate" --ignore-eos --vocab-size ${VOCAB:-32000} \
    --percentiles 50,90,99 --result-json "$out/latency-$rate.json" | tail -25
  seed=$((seed + 1))
done
stop_server
python - "$out" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("latency-*.json"), key=lambda p: float(p.stem.split("-")[1])):
    m = json.loads(path.read_text())["metrics"]
    print(f"{path.stem}: TTFT p50 {m['ttft_ms']['median']:.0f} p99 {m['ttft_ms']['p99']:.0f} ms; TPOT p50 "
          f"{m['tpot_ms']['median']:.2f} p99 {m['tpot_ms']['p99']:.2f} ms; {m['output_throughput']:.0f} out tok/s; "
          f"{m['completed']} done, {m['failed']} failed")
PY
