#!/usr/bin/env bash
# On a machine with a CUDA GPU: one denoising forward of full-size Wan 2.1 transformers (random
# weights), stock diffusers + cuDNN SDPA against sapattn at a fixed density (bench/dit_forward.py).
# Uses a prebuilt libsapattn_torch.so and diffusers from .whl/ as scripts/device_test_python.sh
# does. Logs go to $OUT or ./device-logs.
#
#   scripts/device_bench_dit.sh [LIBRARY] [MODELS] [DENSITY]     (defaults: build/python/..., wan13b,wan14b, 0.15)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-logs}
mkdir -p "$out"
. scripts/device_python_env.sh "${1:-build/python/libsapattn_torch.so}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 bench/dit_forward.py --models "${2:-wan13b,wan14b}" --density "${3:-0.15}" --reps 3 2>&1 |
  grep -v "should be kept in float32" | tee "$out/dit_forward.log"
exit "${PIPESTATUS[0]}"
