# scripts/device.sh test-python [LIBRARY]
#
# The Python tests (PyTorch ops, diffusers integration) on the GPU.
#
# SAPATTN_TEST_DEVICES is cuda unless set. LIBRARY (default build/python/libsapattn_torch.so) is a
# prebuilt libsapattn_torch.so, built on the dev machine against the same torch and carried; without
# one, this builds the package here (pip, with its CMake build in build-device) into
# /tmp/sapattn-wheels/sapattn. diffusers comes from the wheels in .whl/ when the machine lacks it.
# The generate command's test runs on the CPU in CI and is left out here (the GPU image has no
# imageio-ffmpeg).
#
# Writes to $OUT or ./device-logs: gpu.txt (with the diffusers and transformers versions), pytest.log,
# pytest.xml (and pip-install.log when it builds).

# shellcheck shell=bash disable=SC2154  # out, build_dir, wheel_root: set by common.sh

device_main() {
  local lib=${1:-build/python/libsapattn_torch.so}
  if [ ! -f "$lib" ]; then
    local pkg=$wheel_root/sapattn
    SAPATTN_BUILD_DIR=$build_dir CMAKE_CUDA_ARCHITECTURES=90 python3 -m pip install -q --no-build-isolation \
      --no-deps --target "$pkg" . >"$out/pip-install.log" 2>&1 || {
      tail -30 "$out/pip-install.log"
      return 1
    }
    lib=$pkg/sapattn/libsapattn_torch.so
  fi
  use_torch_library "$lib"
  export SAPATTN_TEST_DEVICES=${SAPATTN_TEST_DEVICES:-cuda}
  describe_gpu diffusers transformers
  python3 -m pytest python/tests -q -p no:cacheprovider -k "not generate" \
    --junitxml="$out/pytest.xml" 2>&1 | tee "$out/pytest.log"
  return "${PIPESTATUS[0]}"
}
