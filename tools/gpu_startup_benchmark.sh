#!/usr/bin/env bash
# Start-up of the B2 server (issue 20: <= 45 s cold, <= 10 s from the compilation cache), started as
# tools/gpu_latency_benchmark.sh starts it: random weights at $MODEL's shapes, 24 buckets. Three starts
# in one call: cold (an empty compilation cache), then twice from the cache the first one filled.
# Each start is timed from the command's launch by tools/bench_startup.py: the port answering, the
# weights loaded, /v1/ready 200 (the essential buckets compiled) and every bucket compiled
# (xlserve:startup_buckets_remaining 0), with the load average beside them.
#   MODEL=.bench/llama3-8b-v32k bash tools/gpu_startup_benchmark.sh    # results: $OUT/startup-*.json
# COMPILE_THREADS="1 16": also time the parallel compile of the same buckets in one process at those
# thread counts (bench_startup compile), to show its scaling on this host's cores.
set -uo pipefail
model=${MODEL:?set MODEL to a folder with config.json and tokenizer files}
out=${OUT:-out}
cache=${CACHE_DIR:-$(mktemp -d)/jax-cache}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
flags=(--load-format dummy --server-name 127.0.0.1 --server-port 23333 --max-queue-len 100000
  --session-len 2048 --max-batch-size ${MAX_BATCH:-512}
  --decode-batch-buckets ${DECODE_BUCKETS:-1 2 4 8 16 32 64 128 256 512}
  --prefill-row-buckets ${PREFILL_ROWS:-1 2 3 4 6 8 12 16 24 32 48 64} --prefill-token-buckets 128
  --max-prefill-token-num 8192 --packed-prefill-buckets ${PACKED:-128 256 512 1024 2048 4096 8192}
  --compilation-cache-dir "$cache" ${SERVER_FLAGS:-})
for run in cold cached cached-2; do
  python -m tools.bench_startup --label "$run" --json "$out/startup-$run.json" -- \
    python -m serving.cli serve api_server "$model" "${flags[@]}"
done
for threads in ${COMPILE_THREADS:-}; do
  python -m tools.bench_startup compile --model "$model" --load-format dummy --session-len 2048 \
    --max-batch-size ${MAX_BATCH:-512} --decode-buckets 1,2,4,8,16,32,64,128,256,512 \
    --prefill-rows 1,2,3,4,6,8,12,16,24,32,48,64 --prefill-tokens 128 --max-prefill-tokens 8192 \
    --packed-prefill 128,256,512,1024,2048,4096,8192 --threads "$threads" --json "$out/compile-$threads.json"
done
