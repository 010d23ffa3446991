#!/usr/bin/env bash
# Makes sure the build tools are present: a C++20 compiler, CMake >= 3.22, GoogleTest and zlib.
# Installs what is missing with apt-get when it can (root on Debian/Ubuntu); otherwise says what to
# install and stops.
set -euo pipefail

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
