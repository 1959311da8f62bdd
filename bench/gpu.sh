#!/usr/bin/env bash
# The whole GPU check in one call: install wheels carried in .whl/ (e.g. diffusers, for its block
# as the baseline), run the benchmark, then the GPU-only tests. Results go to $OUT (or bench-out).
#   bench/gpu.sh [bench/gpu.py options]          the block, full-forward and FP8 benchmark
#   bench/gpu.sh --suite engines [--tiny]        which engine of ours serves a GPU, about 420 s on an
#                                                H100/H200: the AOTInductor diagnosis, the 14B forward
#                                                (8 of 40 blocks timed, extrapolated per block) for
#                                                diffusers eager and compiled, ours eager, compiled and
#                                                the inductor artifact, then cold starts (14B dims, 2
#                                                blocks: compile time does not grow with blocks)
#   bench/gpu.sh --suite features [--tiny]       the GPU numbers of the LoRA, step caching and INT8/INT4 work, about
#                                                260 s: set_loras on a 14B expert (rank 64 on every linear
#                                                layer; goal under 5 s), then step caching at 14B dims, 4
#                                                blocks, 480p, 8 guided steps (ours vs diffusers' hooks),
#                                                then one 14B block's linear part at 480p: bf16 vs INT8
#                                                vs INT4, eager and compiled (INT8 goal: 1.4x bf16)
#                                                needs diffusers: put its wheel in .whl/ first (pip download
#                                                diffusers --no-deps -d .whl; .whl/ is git-ignored, carry it)
#   --tiny runs the same suite at toy sizes on whatever device there is (what the CPU test runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && PYTHONPATH=$PWD:/tmp/site
fi
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"

if [ "${1:-}" = "--suite" ] && [ "${2:-}" = "engines" ]; then
  shift 2
  TINY=0; [ "${1:-}" = "--tiny" ] && TINY=1
  DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  if [ "$TINY" = 1 ]; then
    PROBE="--quick"; BENCH="--tiny --full-layers 4 --repeats 2"; COLD="--preset tiny-t2v --latent 2,4,6 --text-tokens 16"
  else
    PROBE=""; BENCH="--full-layers 8 --repeats 5 --budget 220"; COLD="--preset wan2.1-t2v-14b --layers 2 --latent 21,60,104"
  fi
  DTYPE=float32; [ "$DEVICE" = cuda ] && DTYPE=bfloat16
  echo "== AOTInductor diagnosis ($DEVICE)"
  timeout 150 $PY bench/aoti_probe.py --device "$DEVICE" $PROBE --timeout 60 --json "$OUT/aoti_probe.json" 2>&1 | tee "$OUT/aoti_probe.log"
  echo "== full forward: diffusers eager/compiled, ours eager/compiled/inductor artifact"
  timeout 260 $PY bench/gpu.py --out "$OUT" --device "$DEVICE" --cases full480 --skip aoti,cudagraph,micro $BENCH 2>&1 | tee "$OUT/bench.log"
  echo "== cold starts"
  timeout 200 $PY bench/cold_start.py $COLD --device "$DEVICE" --dtype "$DTYPE" --calls 2 \
    --routes "eager,compile (empty cache),compile (warm cache),inductor" --json "$OUT/cold_start.json" 2>&1 | tee "$OUT/cold_start.log"
  exit 0
fi

if [ "${1:-}" = "--suite" ] && [ "${2:-}" = "features" ]; then
  shift 2
  TINY=0; [ "${1:-}" = "--tiny" ] && TINY=1
  DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  DTYPE=float32; [ "$DEVICE" = cuda ] && DTYPE=bfloat16
  if [ "$TINY" = 1 ]; then
    SWAP="--preset tiny-t2v --repeats 2"; CACHE="--preset tiny-t2v --layers 3 --latent 2,4,6 --steps 6 --threshold-fbc 0.6 --threshold-mag 0.3"
    LINEAR="--preset mid-i2v --tokens 64 --repeats 2"
  else
    SWAP="--preset wan2.1-t2v-14b --repeats 3"; CACHE="--preset wan2.1-t2v-14b --layers 4 --latent 21,60,104 --steps 8"
    LINEAR="--preset wan2.1-t2v-14b --tokens 32760 --repeats 10"
  fi
  echo "== LoRA swap on the model ($DEVICE, $DTYPE)"
  timeout 200 $PY bench/lora_swap.py --swap-only $SWAP --device "$DEVICE" --dtype "$DTYPE" --json "$OUT/lora_swap.json" 2>&1 | tee "$OUT/lora_swap.log"
  echo "== step caching: ours vs diffusers' hooks vs none"
  timeout 240 $PY bench/step_cache.py $CACHE --device "$DEVICE" --dtype "$DTYPE" --no-engine --json "$OUT/step_cache.json" 2>&1 | tee "$OUT/step_cache.log"
  echo "== the linear part of a block: bf16 vs INT8 W8A8 vs INT4 weight-only"
  timeout 120 $PY bench/int8_linear.py $LINEAR --device "$DEVICE" --json "$OUT/int8_linear.json" 2>&1 | tee "$OUT/int8_linear.log"
  exit 0
fi

$PY bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
