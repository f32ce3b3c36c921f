# Issue 20's B1 and B3 as `tools.bench_engine` arguments after `--shape llama3-8b`, sourced by the GPU scripts
# that compare runs of them (gpu_compare_commits.sh, gpu_tp_benchmark.sh), so each measures the same workload.
# B1: one stream, 128 prompt tokens, 1024 generated, twice. B3: 1000 requests of 256 in / 256 out at once.
# shellcheck disable=SC2034  # used by the scripts that source this file
B1_ENGINE=(--attention-backend pallas --session-len 2048 --decode-buckets 1 --prefill-rows 1 --prefill-tokens 128)
B1=("${B1_ENGINE[@]}" single --input-len 128 --output-len 1024 --repeats 2)
B3=(--attention-backend pallas --session-len 1024 --decode-buckets 64,128,256 --prefill-rows 8,16,32
    --prefill-tokens 256 --max-prefill-tokens 8192 throughput --num-prompts 1000 --input-len 256 --output-len 256)
