#!/usr/bin/env bash
# Issue 25's table on a CPU, xlserve and transformers alternating in one command, REPEATS times:
# SmolLM2-135M-Instruct from the GGUF file (the real-model tier's), the default session length (8192), 64-token
# prompts, 128 generated tokens, greedy; xlserve's default weights (bf16 on a CPU with AMX or AVX512-BF16, else
# the file's blocks in float32: serving/engine/engine.py, default_weight_format; ENGINE_FLAGS="--dtype float32"
# SERVER_FLAGS="--dtype float32" for float32 everywhere), transformers' in float32.
#   batch 1:  tools.bench_engine single --baseline transformers (xlserve's engine, then transformers'
#             `generate`, in one process; targets: >= 1.3x)
#   16 concurrent requests through HTTP: a fresh `xlserve serve api_server` (once every bucket compiled),
#             tools.bench_serving --num-prompts 16 --baseline transformers (the same prompts as one static
#             batch of 16 through `generate` while the server idles; target >= 2x)
# Each figure is printed with the load average (`uptime`) before it. JSON results under OUT.
set -uo pipefail
PYTHON=${PYTHON:-$(command -v python)}
REPEATS=${REPEATS:-2}
PORT=${PORT:-23941}
OUT=${OUT:-.bench/issue25}
GGUF=${GGUF:-$PWD/.models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT"
[ -f "$GGUF" ] || "$PYTHON" -m tests.real_model
for i in $(seq "$REPEATS"); do
  echo "== repeat $i: batch 1; load: $(uptime)"
  "$PYTHON" -m tools.bench_engine --model "$GGUF" --session-len 8192 ${ENGINE_FLAGS:-} --baseline transformers \
    --json "$OUT/batch1-$i.json" single --input-len 64 --output-len 128 --repeats 2 2>&1 \
    | grep -E "decode|transformers|compilations"
  echo "== repeat $i: 16 concurrent through HTTP; load: $(uptime)"
  "$PYTHON" -m serving.cli serve api_server "$GGUF" --server-name 127.0.0.1 --server-port "$PORT" \
    ${SERVER_FLAGS:-} > "$OUT/server-$i.log" 2>&1 &
  server=$!
  for _ in $(seq 1200); do  # ready, then every bucket compiled and run once
    remaining=$(curl -sf "http://127.0.0.1:$PORT/v1/ready" > /dev/null && curl -sf "http://127.0.0.1:$PORT/metrics" \
      | awk '/^xlserve:startup_buckets_(remaining|unrun)/ {n += $2; seen++} END {if (seen == 2) print n}')
    case "$remaining" in 0|0.0) break ;; esac
    kill -0 $server 2> /dev/null || { tail -20 "$OUT/server-$i.log"; exit 1; }
    sleep 0.5
  done
  grep "ready after\|buckets compiled after" "$OUT/server-$i.log"
  "$PYTHON" -m tools.bench_serving --base-url "http://127.0.0.1:$PORT" --num-prompts 16 --input-len 64 \
    --output-len 128 --ignore-eos --vocab-size 49152 --baseline transformers --baseline-model "$GGUF" \
    --result-json "$OUT/http16-$i.json" 2>&1 | grep -E "throughput|transformers|Output|x[0-9]"
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^xlserve:compilations_after_warmup"
  kill -INT $server
  wait $server
done
