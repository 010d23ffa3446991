# scripts/device.sh bench-stack [LIBRARY] [MODEL] [STEPS] [DENSITY]
#
# A shortened Wan 2.1 denoising schedule, stock against step caching, SVG2 and both, in one run.
#
# bench/dit_schedule.py: a full-size Wan 2.1 transformer with random weights in bf16, STEPS steps
# with CFG (two forwards each) as WanPipeline runs them, four stacks on the same inputs: stock
# diffusers with cuDNN SDPA, + MagCache with a fixed skip pattern, + SVG2 at a fixed DENSITY (the
# official dense warm-up scaled to STEPS), + both. Every forward timed with CUDA events; the table
# also projects a 50-step generation. LIBRARY is a prebuilt libsapattn_torch.so (default
# build/python/libsapattn_torch.so); diffusers comes from the wheels in .whl/ as for test-python.
# MODEL defaults to wan14b (720p, 75,600 tokens), STEPS to 6 (about 8 minutes on an H100),
# DENSITY to 0.15.
#
# Writes to $OUT or ./device-logs: gpu.txt, dit_schedule.log.

# shellcheck shell=bash disable=SC2154  # out: set by common.sh

device_main() {
  use_torch_library "${1:-build/python/libsapattn_torch.so}"
  describe_gpu diffusers
  python3 bench/dit_schedule.py --model "${2:-wan14b}" --steps "${3:-6}" --density "${4:-0.15}" 2>&1 |
    grep -v "should be kept in float32" | tee "$out/dit_schedule.log"
  return "${PIPESTATUS[0]}"
}
