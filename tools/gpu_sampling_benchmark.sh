#!/usr/bin/env bash
# B3 (1000 x 256 in / 256 out, greedy, ignore_eos) with the sampling surface of issue 18, one run each on
# the same card: plain, every request asking for 5 top log probabilities (the extended sampler and its
# copy to the host), and every request constrained by a regex on the device path. MODEL: a folder with
# config.json and a tokenizer (grammars need the vocabulary), served with random weights.
#   MODEL=.bench/llama3-8b-v32k bash tools/gpu_sampling_benchmark.sh
set -uo pipefail
model=${MODEL:?set MODEL to a folder with config.json and tokenizer files}
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
b3=(--attention-backend pallas --session-len 1024 --decode-buckets 64,128,256 --prefill-rows 8,16,32
    --prefill-tokens 256 --max-prefill-tokens 8192 throughput --num-prompts 1000 --input-len 256 --output-len 256)
run() {  # name extra-flags...
  name=$1; shift
  echo "== $name: $*"
  python -m tools.bench_engine --model "$model" --load-format dummy --json "$out/$name.json" "$@" "${b3[@]}" 2>&1 \
    | grep -v -i warn | tail -3
}
run b3-plain
run b3-logprobs5 --logprobs 5
run b3-guided-regex --guided-regex '[a-z ,.]+'
