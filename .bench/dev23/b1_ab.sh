#!/usr/bin/env bash
# B1 fp8 (and int8) at HEAD (.old) against the working tree (f32 one-row sums handed to the rope and norm kernels), alternated.
set -uo pipefail
python -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name --format=csv,noheader
b1() {  # tree quant
  (cd "$1" && PYTHONPATH=$PWD timeout 150 python -m tools.bench_engine --shape llama3-8b --weight-quant "$2" --attention-backend pallas \
    --session-len 2048 --decode-buckets 1 --prefill-rows 1 --prefill-tokens 128 single --input-len 128 --output-len 1024 \
    --repeats 2 2>&1 | grep -v -i 'warn\|delay kernel' | grep -E "single stream|rror" | head -3)
}
for r in 1 2; do
  echo "== fp8 old $r: $(b1 .old fp8)"; echo "== fp8 new $r: $(b1 . fp8)"
done

cd . && PYTHONPATH=$PWD timeout 100 python -m tools.bench_engine --shape llama3-8b --weight-quant fp8 --attention-backend pallas --session-len 2048 --decode-buckets 1 --prefill-rows 1 --prefill-tokens 128 single --input-len 128 --output-len 256 --repeats 1 --trace /tmp/t 2>&1 | grep "single stream"
f=$(find /tmp/t -name "*perfetto*trace.json.gz" | head -1); cp $f $OUT/new.json.gz; PYTHONPATH=$PWD python -m tools.trace_summary $f --kernels 14 | tail -15
