# scripts/device.sh bench-ops [BIN_DIR] [SHAPE]
#
# The CUDA ops' benchmark with its floors and peers, and the table of docs/cuda.md.
#
# Times k-means, order_clusters, selection and permutation at the official SVG2 shapes, measures
# the floors (copy rate, bf16 matrix rate) and the peers (flash-kmeans, a torch permutation) in the
# same run, and prints the table. SHAPE: all (default), wan14b, wan13b, hunyuan.
#
# BIN_DIR (default build-device) holds a prebuilt sapattn_bench_ops, flat or under bench/; without
# one, this builds it in build-device. flash-kmeans comes from a wheel in .whl/ when there is one
# (pip download --no-deps flash-kmeans).
#
# Writes to $OUT or ./device-logs: gpu.txt, ops.jsonl, ops.err, peers.jsonl, peers.err, table.md.

# shellcheck shell=bash disable=SC2154  # out, build_dir, wheel_root: set by common.sh

device_main() {
  local exe
  exe=$(binary_or_build sapattn_bench_ops "${1:-$build_dir}" bench -DSAPATTN_BUILD_TESTS=OFF \
    -DSAPATTN_BUILD_BENCH=ON) || return 1
  local shape=${2:-all} rc_ops rc_peers
  install_wheels base
  describe_gpu
  "$exe" --shape "$shape" >"$out/ops.jsonl" 2>"$out/ops.err"
  rc_ops=$?
  PYTHONUNBUFFERED=1 python3 bench/peers.py --shape "$shape" >"$out/peers.jsonl" 2>"$out/peers.err"
  rc_peers=$?
  python3 bench/report.py "$out/ops.jsonl" "$out/peers.jsonl" | tee "$out/table.md"
  echo "exit: ops $rc_ops, peers $rc_peers"
  [ "$rc_ops" -eq 0 ]
}
