#!/usr/bin/env bash
# Start-up on CPU, before/after in one command: the built-in demo and SmolLM2-135M (the real-model tier's
# GGUF file), each server started REPEATS times, alternating between the trees named in TREES (default:
# this checkout only; e.g. TREES="/path/to/old-checkout $PWD" puts the code before a change beside it).
# Each tree's code runs through PYTHONPATH with this checkout's Python. Prints one line per start
# (tools/bench_startup.py) with the load average; JSON per tree and model under OUT (default: .bench/startup).
set -euo pipefail
PYTHON=${PYTHON:-$(command -v python)}
REPEATS=${REPEATS:-2}
TREES=${TREES:-$PWD}
PORT=${PORT:-23931}
OUT=${OUT:-.bench/startup}
GGUF=${GGUF:-$PWD/.models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT"
[ -f "$GGUF" ] || "$PYTHON" -m tests.real_model
bench=$PWD
for i in $(seq "$REPEATS"); do
  for tree in $TREES; do
    name=$(basename "$tree")
    for model in demo smollm2; do
      args=()
      [ "$model" = smollm2 ] && args=("$GGUF")
      (cd "$tree" && PYTHONPATH="$tree" "$PYTHON" -m tools.bench_startup --label "$name $model" \
        --json "$bench/$OUT/$name-$model-$i.json" -- "$PYTHON" -m serving.cli serve api_server "${args[@]}" \
        --server-port "$PORT")
    done
  done
done
