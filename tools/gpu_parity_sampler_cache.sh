#!/usr/bin/env bash
# Issue 4's GPU runs (docs/perf-notes.md, docs/benchmarks.md), in two calls of at most 10 minutes:
#   parity  the Pallas-vs-XLA greedy gate on random and on previous-token-circuit ("copy") weights
#   speed   start-up compile seconds on an empty then a filled compilation cache; B1 greedy and with
#           top-p (new static sampler; then the old one if .bench/old_sampling.py holds it)
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
quiet() { grep -v -i warn; }
b1="--shape llama3-8b --attention-backend pallas --session-len 2048 --decode-buckets 1 --prefill-rows 1 --prefill-tokens 128"
case ${1:-parity} in
parity)
  for weights in random copy; do
    python -m tools.check_backend_parity --shape llama3-8b --backends xla,pallas --num-prompts 32 \
      --weights $weights --json "$out/parity-$weights.json" 2>&1 | quiet | tee "$out/parity-$weights.log"
  done ;;
speed)
  for run in cold warm; do
    echo "== compile cache $run"
    python -m tools.bench_engine $b1 --compilation-cache-dir /tmp/xlserve-cc --bandwidth 2.98e12 \
      --json "$out/cache-$run.json" single --input-len 128 --output-len 64 --repeats 1 2>&1 | quiet
  done
  echo "== B1 greedy, new sampler"
  python -m tools.bench_engine $b1 --compilation-cache-dir /tmp/xlserve-cc --bandwidth 2.98e12 \
    --json "$out/b1-greedy.json" single --input-len 128 --output-len 1024 2>&1 | quiet
  echo "== B1 top-p 0.9 (temperature 1), new sampler"
  python -m tools.bench_engine $b1 --compilation-cache-dir /tmp/xlserve-cc --bandwidth 2.98e12 \
    --temperature 1.0 --top-p 0.9 --json "$out/b1-topp-new.json" single --input-len 128 --output-len 1024 2>&1 | quiet
  if [ -f .bench/old_sampling.py ]; then
    echo "== B1 top-p 0.9 (temperature 1), old sampler (lax.cond + dynamic fori_loop)"
    rm -rf /tmp/old && mkdir /tmp/old && cp -r configs xlkernels model serving tools /tmp/old/
    cp .bench/old_sampling.py /tmp/old/serving/engine/sampling.py
    sed -i 's/import RowParams, SamplingBatch, sample, sample_mode, sample_modes/import ALL_GREEDY, NO_SEARCH, SEARCH, RowParams, SamplingBatch, sample, sample_mode/; s/for mode in sample_modes(rows):/for mode in (ALL_GREEDY, NO_SEARCH, SEARCH):/' /tmp/old/serving/engine/runner.py
    (cd /tmp/old && python -m tools.bench_engine $b1 --compilation-cache-dir off --bandwidth 2.98e12 \
      --temperature 1.0 --top-p 0.9 --json "$out/b1-topp-old.json" single --input-len 128 --output-len 1024 2>&1 | quiet)
  fi ;;
esac
