#!/usr/bin/env bash
# Makes sure the build tools are present: a C++20 compiler, CMake >= 3.22, GoogleTest and zlib.
# Installs what is missing with apt-get when it can (root on Debian/Ubuntu); otherwise says what to
# install and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 || missing+=(make)
[ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
if [ ! -e /usr/include/gtest/gtest.h ] && [ ! -e /usr/local/include/gtest/gtest.h ]; then missing+=(libgtest-dev); fi

if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing ${missing[*]}; install them, e.g.: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

version=$(cmake --version | head -n1 | sed 's/[^0-9.]*\([0-9.]*\).*/\1/')
if [ "$(printf '%s\n3.22\n' "$version" | sort -V | head -n1)" != "3.22" ]; then
  echo "bootstrap: CMake $version is too old; sapattn needs 3.22 or newer (pip install cmake)" >&2
  exit 1
fi

# The CUDA backend's Hopper kernel is written with CuTe; its headers come from NVIDIA's PyPI package
# nvidia-cutlass (never committed). Fetched only where nvcc is installed, once, into .deps/.
cutlass_version=4.2.0.0
cutlass_dir=.deps/cutlass
if command -v nvcc >/dev/null 2>&1 && [ ! -e "$cutlass_dir/include/cute/tensor.hpp" ]; then
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    echo "bootstrap: the CUDA build needs the CUTLASS headers; install python3 and pip (apt-get install" \
      "python3-pip) or build without CUDA (cmake -DSAPATTN_CUDA=OFF)" >&2
    exit 1
  fi
  echo "bootstrap: fetching CUTLASS headers (nvidia-cutlass==$cutlass_version from PyPI)" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" "nvidia-cutlass==$cutlass_version"
  python3 -m zipfile -e "$tmp"/nvidia_cutlass-*.whl "$tmp/x"
  mkdir -p "$cutlass_dir"
  rm -rf "$cutlass_dir/include"
  cp -r "$tmp/x/cutlass_library/source/include" "$cutlass_dir/include"
fi
