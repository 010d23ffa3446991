#!/usr/bin/env bash
# Builds sapattn and runs its main job, the demo, on the CPU. Extra arguments go to `sapattn demo`
# (e.g. --out DIR, --top-p 0.8). Pictures and a summary land in out/demo by default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target sapattn_cli -j "$(nproc)"
./build/sapattn demo "$@"
