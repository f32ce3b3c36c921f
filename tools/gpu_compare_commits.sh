#!/usr/bin/env bash
# B1 and B3 of two trees of the project in one call, alternating, on the same card: a change that should
# not move speed (a refactor) is checked against the commit before it. The other tree is an export of
# that commit in .old/ (ignored; carry it): `git archive BEFORE | tar -x -C .old`.
#   OLD=.old bash tools/gpu_compare_commits.sh      # Llama-3.1-8B shapes, random bf16 weights
set -uo pipefail
old=${OLD:-.old}
out=$(mkdir -p "${OUT:-out}" && cd "${OUT:-out}" && pwd)  # absolute: each run cds into its tree
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
source "$(dirname "$0")/gpu_workloads.sh"  # B1, B3
run() {  # tree name bench-args...
  tree=$1; name=$2; shift 2
  echo "== $name ($tree)"
  (cd "$tree" && python -m tools.bench_engine --shape llama3-8b --json "$out/$name.json" "$@" 2>&1 \
    | grep -v -i warn | tail -8)
}
for round in $(seq 1 "${ROUNDS:-1}"); do
  run "$old" "b1-before-$round" "${B1[@]}"
  run . "b1-after-$round" "${B1[@]}"
  run "$old" "b3-before-$round" "${B3[@]}"
  run . "b3-after-$round" "${B3[@]}"
done
python - "$out" <<'PY'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("b*-*.json")):
    data = json.loads(path.read_text())
    rate = data.get("tok_s") or data.get("output_tok_s")  # single (B1) or throughput (B3)
    rows.append((path.stem, rate, {k: v for k, v in data.items() if isinstance(v, (int, float))}))
for name, rate, numbers in rows:
    print(f"{name:16s} {rate}  {numbers}")
PY
