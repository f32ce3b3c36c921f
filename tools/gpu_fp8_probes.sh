#!/usr/bin/env bash
# The next GPU call for issue 21's B3 >= 18,000 (fp8 weights, fp8 KV, 512 rows: 17,617-17,833 at `96ca26e`),
# one call of ~5 minutes: the two candidates prepared on CPU, then the B3 run they are for.
#   1. the decode kernel over quantized pages dotted in float16 (`half_dots`) against bf16, at 1 and 4 warps
#   2. the fused silu(gate) * up -> e4m3 kernel against XLA's row scaling (`tools.bench_mlp_quant`)
#   3. B3 with fp8 weights and fp8 KV at 512 rows, as measured last
# docs/perf-notes.md (eleventh session) says what each is expected to move. Results: $OUT (or ./out).
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
for shape in "512 385" "256 1024"; do
  set -- $shape
  timeout 120 python -m tools.bench_decode_formats --batch "$1" --context "$2" --policies fp8,8 --ppb 1 --warps 1,4 \
    --stages 3 --dots bf16,f16 2>&1 | grep -v -i warn | tee -a "$out/decode_formats.txt"
done
timeout 120 python -m tools.bench_mlp_quant 2>&1 | grep -v -i warn | tee "$out/mlp_quant.txt"
timeout 150 python -m tools.bench_engine --shape llama3-8b --attention-backend pallas --weight-quant fp8 --quant-policy fp8 \
  --session-len 512 --max-batch-size 512 --decode-buckets 128,256,512 --prefill-rows 8,16,32 --prefill-tokens 256 \
  --max-prefill-tokens 8192 throughput --num-prompts 1000 --input-len 256 --output-len 256 2>&1 \
  | grep -E "started|throughput:|compilations" | tee "$out/b3.txt"
