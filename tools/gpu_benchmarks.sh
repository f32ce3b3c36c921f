#!/usr/bin/env bash
# The engine benchmarks recorded in docs/benchmarks.md, as run on the lent H100 (Llama-3.1-8B shapes,
# random bf16 weights). Results go to $OUT (or ./out) as JSON, one file per run.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
bench() { name=$1; shift; echo "== $name: $*"; python -m tools.bench_engine --shape llama3-8b --json "$out/$name.json" "$@" 2>&1 | grep -v -i warn; }
# B1: one stream, 128 prompt tokens, 1024 generated; our Pallas kernels, then the XLA reference.
bench b1-pallas --attention-backend pallas --session-len 2048 --decode-buckets 1 --prefill-rows 1 --prefill-tokens 128 \
  single --input-len 128 --output-len 1024 --trace /tmp/b1-trace
find /tmp/b1-trace -name "*perfetto*trace.json.gz" -exec cp {} "$out/b1-trace.json.gz" \;
bench b1-xla --attention-backend xla --session-len 2048 --decode-buckets 1 --prefill-rows 1 --prefill-tokens 128 \
  single --input-len 128 --output-len 1024 --repeats 1
# B3: 1000 requests of 256 in / 256 out submitted at once.
bench b3-pallas --attention-backend pallas --session-len 1024 --decode-buckets 64,128,256 --prefill-rows 8,16,32 \
  --prefill-tokens 256 --max-prefill-tokens 8192 throughput --num-prompts 1000 --input-len 256 --output-len 256
