# What every subcommand of scripts/device.sh shares: where logs go, the one GPU description, the one
# build folder for GPU builds, and the one scheme for private wheel folders. Sourced by
# scripts/device.sh with the repository root as the working directory.

# shellcheck shell=bash

# The folder GPU builds go to when no prebuilt binary is given (configured here with Ninja, sm_90;
# an existing build there is reused, whatever configured it).
build_dir=build-device

# Logs and results: the device tool's $OUT, or ./device-logs.
device_preamble() {
  out=${OUT:-device-logs}
  mkdir -p "$out"
}

# gpu.txt: the GPU (name, driver, memory, SM clock now and at most), Python and torch, and the
# version of each module named (flashinfer, diffusers, ...) or why it does not import. Echoed too.
describe_gpu() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c 'import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, torch.version.cuda)' 2>/dev/null ||
      echo "torch does not import"
    local module line
    for module in "$@"; do
      line=$(python3 -c "import $module; print('$module', $module.__version__)" 2>&1) ||
        line="$module does not import: $(tail -1 <<<"$line")"  # the exception, not the traceback
      echo "$line"
    done
  } | tee "$out/gpu.txt"
}

# The path of NAME in BIN_DIR, flat (as the device tool carries binaries) or under SUBDIR (a CMake
# build folder); nothing and status 1 when neither is executable.
find_binary() {
  local name=$1 bin=$2 subdir=$3 c
  for c in "$bin/$name" "$bin/$subdir/$name"; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

# The path of NAME from BIN_DIR, or else of NAME built here: configures $build_dir (Release, CUDA on,
# sm_90, no CLI, plus the CMAKE_OPTIONs given) and builds the target NAME, with configure.log and
# build.log in $out. On failure it prints their tails (on stderr) and the status is 1.
binary_or_build() {
  local name=$1 bin=$2 subdir=$3
  shift 3
  find_binary "$name" "$bin" "$subdir" && return 0
  echo "no $name in $bin: building it in $build_dir" >&2
  local generator=()
  [ -f "$build_dir/CMakeCache.txt" ] || generator=(-G Ninja)  # a reused folder keeps its generator
  if ! cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DSAPATTN_CUDA=ON \
    -DSAPATTN_BUILD_CLI=OFF -DCMAKE_CUDA_ARCHITECTURES=90 "$@" >"$out/configure.log" 2>&1 ||
    ! cmake --build "$build_dir" --target "$name" >"$out/build.log" 2>&1; then
    tail -30 "$out/configure.log" "$out/build.log" >&2 2>/dev/null
    return 1
  fi
  echo "$build_dir/$subdir/$name"
}

# Wheels carried in .whl/ (pip download --no-deps; the machine cannot fetch) go into private folders,
# never over the image's torch: SET "base" is .whl/*.whl, any other SET .whl/SET/*.whl, installed into
# $wheel_root/SET, which then goes first on PYTHONPATH. Status 1: no such wheels; 2: pip failed.
wheel_root=/tmp/sapattn-wheels
install_wheels() {
  local set=$1 src=.whl
  [ "$set" = base ] || src=.whl/$set
  ls "$src"/*.whl >/dev/null 2>&1 || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$wheel_root/$set" "$src"/*.whl || return 2
  export PYTHONPATH=$wheel_root/$set${PYTHONPATH:+:$PYTHONPATH}
}

# For the Python subcommands: the wheels of .whl/ (diffusers, ...), the prebuilt libsapattn_torch.so
# LIBRARY, the checkout's python/ package.
use_torch_library() {
  install_wheels base
  export SAPATTN_TORCH_LIBRARY=$1 PYTHONPATH=$PWD/python:${PYTHONPATH:-} PYTHONUNBUFFERED=1
}
