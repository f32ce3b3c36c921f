#!/usr/bin/env bash
# CUDA GEMV harness (v1/v2/v3) beside XLA's one-row products, then B1 fp8's trace with a per-kernel table.
set -uo pipefail
python -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
(cd .bench/dev23 && ./gemv > $OUT/gemv_cuda.txt 2>&1); grep -E " v2| v3|copy" $OUT/gemv_cuda.txt
timeout 150 python -m tools.bench_gemv --rows 1 --no-pallas > $OUT/xla_gemv.txt 2>&1; grep -E "bf16 dot|fp8 xla reduce|int8 xla reduce" $OUT/xla_gemv.txt
timeout 240 python -m tools.bench_engine --shape llama3-8b --weight-quant fp8 --attention-backend pallas --session-len 2048 --decode-buckets 1 \
  --prefill-rows 1 --prefill-tokens 128 single --input-len 128 --output-len 1024 --repeats 1 --trace /tmp/b1-trace 2>&1 \
  | grep -v -i 'warn\|delay kernel' | grep -iE "tok/s|error" | head -4
find /tmp/b1-trace -name "*perfetto*trace.json.gz" -exec cp {} "$OUT/b1fp8-trace.json.gz" \;
python -m tools.trace_summary "$OUT/b1fp8-trace.json.gz" --kernels 30 > $OUT/b1fp8-summary.txt 2>&1; tail -45 $OUT/b1fp8-summary.txt
