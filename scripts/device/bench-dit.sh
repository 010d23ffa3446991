# scripts/device.sh bench-dit [LIBRARY] [MODELS] [DENSITY]
#
# One forward of full-size Wan 2.1 transformers, stock diffusers against sapattn.
#
# A denoising forward with random weights, stock diffusers + cuDNN SDPA against sapattn at a fixed
# density (bench/dit_forward.py, 3 repetitions). LIBRARY is a prebuilt libsapattn_torch.so (default
# build/python/libsapattn_torch.so); diffusers comes from the wheels in .whl/ as for test-python.
# MODELS defaults to wan13b,wan14b, DENSITY to 0.15. Environment: FP8 (any non-empty value) also times the sparse forward
# with attention_dtype="fp8_e4m3" (--fp8).
#
# Writes to $OUT or ./device-logs: gpu.txt, dit_forward.log.

# shellcheck shell=bash disable=SC2154  # out, build_dir, wheel_root: set by common.sh

device_main() {
  use_torch_library "${1:-build/python/libsapattn_torch.so}"
  describe_gpu diffusers
  python3 bench/dit_forward.py --models "${2:-wan13b,wan14b}" --density "${3:-0.15}" --reps 3 ${FP8:+--fp8} 2>&1 |
    grep -v "should be kept in float32" | tee "$out/dit_forward.log"
  return "${PIPESTATUS[0]}"
}
