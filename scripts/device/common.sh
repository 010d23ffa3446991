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
# $wheel_root/SET, which then goes first on PYTHONPATH. A set too large for one call travels in parts
# (scripts/peer_wheels.sh): see join_wheel_parts. Status 1: no such wheels; 2: pip failed; 3: parts
# still missing.
wheel_root=/tmp/sapattn-wheels
install_wheels() {
  local set=$1 src=.whl
  [ "$set" = base ] || src=.whl/$set
  if [ "$set" != base ] && { [ -f "$src/parts/SHA256SUMS" ] || [ -d "build-wheels/$set" ]; }; then
    join_wheel_parts "$set" || return $?
    src=build-wheels/$set/whl
  fi
  ls "$src"/*.whl >/dev/null 2>&1 || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$wheel_root/$set" "$src"/*.whl || return 2
  export PYTHONPATH=$wheel_root/$set${PYTHONPATH:+:$PYTHONPATH}
}

# The parts of .whl/SET/parts/ carried by this call are moved to build-wheels/SET/ (ignored, so they
# stay on the machine while it is warm). SHA256SUMS names the tar and its sum, COUNT its number of
# parts, SET.tar.00 on. Once all have arrived they are joined, checked and unpacked into
# build-wheels/SET/whl/. Status 3 (and which parts are here) until then; 2 if the joined tar's sum
# does not match (the parts are dropped: carry them again).
join_wheel_parts() {
  local set=$1 keep=build-wheels/$1
  mkdir -p "$keep"
  if [ -d ".whl/$set/parts" ]; then
    mv -f ".whl/$set/parts/"* "$keep/" 2>/dev/null
  fi
  ls "$keep"/whl/*.whl >/dev/null 2>&1 && return 0
  if [ ! -f "$keep/SHA256SUMS" ] || [ ! -f "$keep/COUNT" ]; then
    echo "wheels $set: SHA256SUMS and COUNT not carried yet"
    return 3
  fi
  local tar_name count i part have="" missing=0
  tar_name=$(awk '{print $2}' "$keep/SHA256SUMS")
  count=$(cat "$keep/COUNT")
  for ((i = 0; i < count; i++)); do
    part=$(printf '%s.%02d' "$tar_name" "$i")
    if [ -f "$keep/$part" ]; then have+="${part##*.} "; else missing=1; fi
  done
  if [ $missing -ne 0 ]; then
    echo "wheels $set: parts of $tar_name here: ${have:-none}(of $count) - carry the next"
    return 3
  fi
  (cd "$keep" && for ((i = 0; i < count; i++)); do cat "$(printf '%s.%02d' "$tar_name" "$i")"; done >"$tar_name")
  if ! (cd "$keep" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1); then
    echo "wheels $set: the joined $tar_name does not match SHA256SUMS; parts dropped, carry them again"
    rm -f "$keep/$tar_name" "$keep/$tar_name".[0-9][0-9]
    return 2
  fi
  mkdir -p "$keep/whl" && tar -xf "$keep/$tar_name" -C "$keep/whl" && rm -f "$keep/$tar_name" "$keep/$tar_name".[0-9][0-9]
}

# For the Python subcommands: the wheels of .whl/ (diffusers, ...), the prebuilt libsapattn_torch.so
# LIBRARY, the checkout's python/ package.
use_torch_library() {
  install_wheels base
  export SAPATTN_TORCH_LIBRARY=$1 PYTHONPATH=$PWD/python:${PYTHONPATH:-} PYTHONUNBUFFERED=1
}
