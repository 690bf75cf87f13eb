#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine whose python3 already has torch (no network needed):
# the `gpu` tests (CUDA engine parity, expert math in bf16, gRPC replica on CUDA, NCCL pair when >= 2 GPUs),
# the data-plane benchmark when Ray is importable, and `emoe bench` (transformers vs the in-process engine
# on the bench-small preset, bf16, on the GPU, with its roofline) -- under 8 minutes in all.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/emoe-gpu}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee "$OUT/gpu-tests.log"
status=${PIPESTATUS[0]}
if python3 -c "import ray" 2>/dev/null; then
  timeout 120 python3 -m bench.dataplane --tokens 32,512 --hidden 1024,4096 --iters 100 --json "$OUT/dataplane.json" | tee "$OUT/dataplane.log"
else
  echo "ray not installed here: data-plane benchmark skipped" | tee "$OUT/dataplane.log"
fi
if python3 -c "import transformers, matplotlib, tokenizers" 2>/dev/null; then
  timeout 240 python3 -m bench.perf --preset bench-small --device cuda --backends transformers,inprocess \
    --requests 64 --concurrency 32 --prompt-len 16:512 --output-len 32:256 --out "$OUT/perf-gpu" \
    2>&1 | tee "$OUT/perf-gpu.log"
else
  echo "transformers / matplotlib / tokenizers missing: emoe bench skipped" | tee "$OUT/perf-gpu.log"
fi
exit "$status"
