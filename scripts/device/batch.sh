# scripts/device.sh batch [PACK] [DEADLINE]
#
# The kernel matrix, the ops benchmark and the Python tests in one call, from one carried tarball.
#
# PACK (default build-pack/bins.tar.gz, made on the dev machine by scripts/device_pack.sh) holds
# stripped tests/cuda/test_cuda_ops, bench/sapattn_bench_attention, bench/sapattn_bench_ops and
# libsapattn_torch.so: compressed, the four fit the device tool's 64 MiB carry beside the checkout
# and .whl/, which the binaries alone do not. They are unpacked into build-dev/. Then, each under
# what is left of DEADLINE seconds (default 570): kernel-matrix (CONFIGS, BENCH_UNTIL as there),
# bench-ops on wan14b (at most 140 s) and test-python (the rest). A step is skipped when too little
# time is left; each one's tail is printed.
#
# Writes to $OUT or ./device-logs: matrix.txt, ops.txt, py.txt, and the subcommands' own files under
# matrix/, ops/ and py/.

# shellcheck shell=bash disable=SC2154  # out: set by common.sh

device_main() {
  local pack=${1:-build-pack/bins.tar.gz} deadline=${2:-570} start t
  start=$(date +%s)
  [ -f "$pack" ] || {
    echo "no $pack: make it with scripts/device_pack.sh and carry it" >&2
    return 2
  }
  mkdir -p build-dev "$out/matrix" "$out/ops" "$out/py" && tar -xzf "$pack" -C build-dev || return 1
  left() { echo $((deadline - ($(date +%s) - start))); }
  OUT=$out/matrix TEST_TIMEOUT=${TEST_TIMEOUT:-150} BENCH_UNTIL=${BENCH_UNTIL:-170} PEERS_TIMEOUT=${PEERS_TIMEOUT:-70} \
    timeout "$(left)" bash scripts/device.sh kernel-matrix build-dev >"$out/matrix.txt" 2>&1
  echo "== matrix (exit $?)"
  grep -v '^\[  FAILED  \] .*GetParam' "$out/matrix.txt" | tail -40
  t=$(left)
  if [ "$t" -gt 60 ]; then
    OUT=$out/ops timeout $((t - 50 > 140 ? 140 : t - 50)) bash scripts/device.sh bench-ops build-dev wan14b \
      >"$out/ops.txt" 2>&1
    echo "== ops (exit $?)"
    tail -30 "$out/ops.txt"
  fi
  t=$(left)
  if [ "$t" -gt 40 ]; then
    OUT=$out/py timeout $((t - 10)) bash scripts/device.sh test-python build-dev/libsapattn_torch.so >"$out/py.txt" 2>&1
    echo "== python (exit $?)"
    tail -12 "$out/py.txt"
  fi
}
