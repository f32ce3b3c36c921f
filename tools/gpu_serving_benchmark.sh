#!/usr/bin/env bash
# B2 of docs/benchmarks.md: a ShareGPT-like load through HTTP against `xlserve serve api_server` with
# random weights (--load-format dummy) at Llama-3.1-8B layer shapes. The checkpoint folder needs only
# config.json and a tokenizer: MODEL=path/to/folder. Results go to $OUT (or ./out).
set -uo pipefail
model=${MODEL:?set MODEL to a folder with config.json and tokenizer files}
out=${OUT:-out}
prompts=${NUM_PROMPTS:-1000}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
python -m serving.cli serve api_server "$model" --load-format dummy --server-name 127.0.0.1 --server-port 23333 \
  --session-len 2048 --max-batch-size ${MAX_BATCH:-256} --decode-batch-buckets ${DECODE_BUCKETS:-32 64 128 256} \
  --prefill-row-buckets ${PREFILL_ROWS:-1 2 4 8} --prefill-token-buckets ${PREFILL_TOKENS:-256 512 1024} \
  --max-prefill-token-num 8192 --max-queue-len 100000 > "$out/server.log" 2>&1 &
server=$!
for _ in $(seq 600); do
  curl -sf http://127.0.0.1:23333/v1/ready > /dev/null && break
  kill -0 $server 2> /dev/null || { tail -30 "$out/server.log"; exit 1; }
  sleep 1
done
grep -i "ready after" "$out/server.log"
python -m tools.bench_serving --base-url http://127.0.0.1:23333 --dataset sharegpt-like --num-prompts "$prompts" \
  --request-rate inf --ignore-eos --vocab-size ${VOCAB:-32000} --result-json "$out/b2.json"
# AFTER: a command run against the live server before it stops (e.g. another load generator).
eval "${AFTER:-}"
curl -s http://127.0.0.1:23333/metrics | grep -E "compil|^vllm:num_preemptions" || true
echo "server CPU time (engine thread and event loop together): $(ps -o cputime= -p $server)"
kill -INT $server; wait $server
