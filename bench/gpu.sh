#!/usr/bin/env bash
# The whole GPU check in one call: install wheels carried in .whl/ (e.g. diffusers, for its block
# as the baseline), run the benchmark, then the GPU-only tests. Results go to $OUT (or bench-out).
#   bench/gpu.sh [bench/gpu.py options]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
