#!/usr/bin/env bash
# B4 of docs/benchmarks.md: SGLang's generated-shared-prefix workload (64 groups x 16 prompts, a
# 2048-token system prompt per group, 128-token questions, 256 output tokens, all at once) through
# HTTP against `xlserve serve api_server` with random weights at Llama-3.1-8B layer shapes, once with
# prefix caching off and once on; the second bench_serving run reports the speedup over the first.
# MODEL=path/to/folder with config.json and tokenizer files. Results go to $OUT (or ./out). Both servers
# take the same MAX_BATCH and DECODE_BUCKETS (default 512 and "32 64 128 256 512": with the prefix
# shared, 512 sequences fit; without, the same flags run out of pages and preempt).
# Prefill steps are the GPU preset's (packed over rows of 128 tokens, with mixed steps of up to 64 decoding
# rows: B4's best, docs/benchmarks.md); PREFILL_FLAGS replaces them, e.g. the earlier unpacked record's
# PREFILL_FLAGS="--prefill-row-buckets 1 2 4 16 --prefill-token-buckets 128 512 2048". SERVER_FLAGS go to both servers.
set -uo pipefail
model=${MODEL:?set MODEL to a folder with config.json and tokenizer files}
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92

source "$(dirname "$0")/gpu_server.sh"

serve_and_bench() {  # $1: run name, $2: --enable-prefix-caching or --no-enable-prefix-caching, $3...: bench flags
  local name=$1 caching=$2
  shift 2
  start_server "$out/server-$name.log" "$caching" --session-len 4096 --max-batch-size ${MAX_BATCH:-512} \
    --decode-batch-buckets ${DECODE_BUCKETS:-32 64 128 256 512} \
    --max-prefill-token-num 8192 ${PREFILL_FLAGS:-} ${SERVER_FLAGS:-} || return 1
  python -m tools.bench_serving --base-url http://127.0.0.1:23333 --dataset shared-prefix \
    --num-prompts ${NUM_PROMPTS:-1024} --prompts-per-group 16 --prefix-len 2048 --input-len 128 --output-len 256 \
    --request-rate inf --ignore-eos --vocab-size ${VOCAB:-32000} --result-json "$out/b4-$name.json" "$@"
  stop_server
}

serve_and_bench cache-off --no-enable-prefix-caching
serve_and_bench cache-on --enable-prefix-caching --baseline-json "$out/b4-cache-off.json"
