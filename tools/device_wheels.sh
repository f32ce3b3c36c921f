#!/usr/bin/env bash
# Fill .whl/ (ignored; name it in `run`'s carry) with what the lent GPU machine lacks to serve: the
# workplace's device wheels, plus this project's other runtime dependencies as Python 3.12 wheels for
# x86-64 Linux (the device machine runs Python 3.12 and cannot reach a package index). There, install
# them with `python -m pip install --no-deps .whl/*.whl` (plain `pip` may be another Python's).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
cp ../shared/device-wheels/*.whl .whl/
python -m pip download -q --no-deps -d .whl --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  swagger-ui-bundle-v2 quart-cors tqdm httpx httpcore h11 prometheus-client einops \
  outlines-core llguidance gguf py-spy
ls .whl | wc -l
