#!/usr/bin/env bash
# On a machine with a CUDA GPU: times the CUDA ops at the official SVG2 shapes, measures the floors
# (copy rate, bf16 matrix rate) and the peers (flash-kmeans, a torch permutation) in the same run,
# and prints the table of docs/cuda.md. Logs go to $OUT or ./device-logs.
#
#   scripts/device_bench.sh [BIN_DIR] [SHAPE]      (SHAPE: all, wan14b, wan13b, hunyuan)
#
# flash-kmeans comes from a wheel in .whl/ when there is one (pip download --no-deps flash-kmeans).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-logs}
mkdir -p "$out"
bin=${1:-build-device}
shape=${2:-all}
if [ ! -x "$bin/sapattn_bench_ops" ]; then
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAPATTN_CUDA=ON -DSAPATTN_BUILD_TESTS=OFF \
    -DSAPATTN_BUILD_CLI=OFF -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/configure.log" 2>&1 &&
    cmake --build build-gpu --target sapattn_bench_ops >"$out/build.log" 2>&1 || { tail -30 "$out"/*.log; exit 1; }
  bin=build-gpu/bench
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
"$bin/sapattn_bench_ops" --shape "$shape" >"$out/ops.jsonl" 2>"$out/ops.err"
rc_ops=$?
PYTHONUNBUFFERED=1 python3 bench/peers.py --shape "$shape" >"$out/peers.jsonl" 2>"$out/peers.err"
rc_peers=$?
python3 bench/report.py "$out/ops.jsonl" "$out/peers.jsonl" | tee "$out/table.md"
echo "exit: ops $rc_ops, peers $rc_peers"
[ $rc_ops -eq 0 ]
