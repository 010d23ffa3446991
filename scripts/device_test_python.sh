#!/usr/bin/env bash
# On a machine with a CUDA GPU: the Python tests (PyTorch ops, diffusers integration) on the GPU.
# Uses a prebuilt libsapattn_torch.so (built on the dev machine against the same torch, carried) or
# builds the package here. diffusers comes from .whl/ when the machine lacks it. The generate
# command's test runs on the CPU in CI and is left out here (the GPU image has no imageio-ffmpeg).
# Logs go to $OUT or ./device-logs.
#
#   scripts/device_test_python.sh [LIBRARY]      (default: build/python/libsapattn_torch.so)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-logs}
mkdir -p "$out"
lib=${1:-build/python/libsapattn_torch.so}
if [ ! -f "$lib" ]; then
  SAPATTN_BUILD_DIR=build-python CMAKE_CUDA_ARCHITECTURES=90 python3 -m pip install -q --no-build-isolation \
    --no-deps --target /tmp/sapattn-pkg . >"$out/pip-install.log" 2>&1 || { tail -30 "$out/pip-install.log"; exit 1; }
  lib=/tmp/sapattn-pkg/sapattn/libsapattn_torch.so
fi
. scripts/device_python_env.sh "$lib"
export SAPATTN_TEST_DEVICES=${SAPATTN_TEST_DEVICES:-cuda}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__,
  "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
python3 -m pytest python/tests -q -p no:cacheprovider -k "not generate" \
  --junitxml="$out/pytest.xml" 2>&1 | tee "$out/pytest.log"
exit "${PIPESTATUS[0]}"
