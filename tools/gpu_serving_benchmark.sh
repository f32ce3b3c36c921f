#!/usr/bin/env bash
# B2 of docs/benchmarks.md: a ShareGPT-like load through HTTP against `xlserve serve api_server` with
# random weights (--load-format dummy) at Llama-3.1-8B layer shapes. The checkpoint folder needs only
# config.json and a tokenizer: MODEL=path/to/folder. Results go to $OUT (or ./out). Prefill rows of 128
# tokens: a prompt takes as many rows as it needs, so mixed lengths pad by less than a row each; with
# PACKED (token buckets, default below; PACKED=none turns it off) the matmuls skip even that padding.
# 512 slots: with packed prefill and the engine in its own process (the CLI's default) B2 ran fastest
# at 512 (docs/benchmarks.md); MAX_BATCH=256 DECODE_BUCKETS="32 64 128 256" is the earlier setting.
# Decode buckets down to 1 row: the run ends with a few long requests decoding alone, and a 32-row step
# costs 7.8 ms where a 1-row one costs 5.6 (bench_engine --timeline, docs/perf-notes.md).
# REPEATS=N runs B2 N times, each on a fresh server (a second pass over the same prompts would hit the
# prefix cache), writing b2.json, b2-2.json, ...: B2 varies by ~2% from run to run on one card, and
# after the first start the compilation cache makes a restart take ~30 s. BENCH_FLAGS go to
# tools.bench_serving (e.g. --save-detail for per-request times).
set -uo pipefail
model=${MODEL:?set MODEL to a folder with config.json and tokenizer files}
out=${OUT:-out}
prompts=${NUM_PROMPTS:-1000}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
source "$(dirname "$0")/gpu_server.sh"
packed=${PACKED:-128 256 512 1024 2048 4096 8192}
[ "$packed" = none ] && packed_flags=() || packed_flags=(--packed-prefill-buckets $packed)
for run in $(seq ${REPEATS:-1}); do
  suffix=$([ "$run" = 1 ] || echo "-$run")
  start_server "$out/server$suffix.log" --session-len 2048 --max-batch-size ${MAX_BATCH:-512} \
    --decode-batch-buckets ${DECODE_BUCKETS:-1 2 4 8 16 32 64 128 256 512} --prefill-row-buckets ${PREFILL_ROWS:-1 2 3 4 6 8 12 16 24 32 48 64} \
    --prefill-token-buckets ${PREFILL_TOKENS:-128} --max-prefill-token-num 8192 "${packed_flags[@]}" ${SERVER_FLAGS:-} || exit 1
  python -m tools.bench_serving --base-url http://127.0.0.1:23333 --dataset sharegpt-like --num-prompts "$prompts" \
    --request-rate inf --ignore-eos --vocab-size ${VOCAB:-32000} --result-json "$out/b2$suffix.json" ${BENCH_FLAGS:-}
  # AFTER: a command run against the live server before it stops (e.g. another load generator).
  eval "${AFTER:-}"
  stop_server
done
