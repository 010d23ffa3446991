#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU test suite (every CUDA op against the CPU op), then
# compute-sanitizer memcheck and racecheck over it. Logs go to $OUT (the device tool's folder) or
# ./device-logs. Exits non-zero if anything failed.
#
#   scripts/device_test.sh [BIN_DIR]
#
# BIN_DIR holds a prebuilt test_cuda_ops (as the device tool carries it, built on the dev machine
# with -DSAPATTN_CUDA=ON); without one, this configures and builds here with
# -DSAPATTN_CUDA=ON -DSAPATTN_CUDA_TESTS=ON (needs GoogleTest).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-logs}
mkdir -p "$out"
bin=${1:-build-device}
if [ ! -x "$bin/test_cuda_ops" ]; then
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAPATTN_CUDA=ON -DSAPATTN_CUDA_TESTS=ON \
    -DSAPATTN_BUILD_CLI=OFF -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/configure.log" 2>&1 &&
    cmake --build build-gpu --target test_cuda_ops >"$out/build.log" 2>&1 || { tail -30 "$out"/*.log; exit 1; }
  bin=build-gpu/tests/cuda
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"

start=$(date +%s)
"$bin/test_cuda_ops" --gtest_output="xml:$out/test_cuda_ops.xml" >"$out/test.log" 2>&1
rc_test=$?
t_test=$(( $(date +%s) - start ))
grep -E '^\[(assign|update|kmeans|select|graph|device)' "$out/test.log" | tee "$out/numbers.txt"

# The sanitizers skip the realistic sizes (names with "Large", the 75600-token permutation) to fit
# the time, and the test that asks for a device that does not exist on purpose (the sanitizer
# reports every failed API call); racecheck runs the suites whose kernels share memory.
small='-*Large*:*N75600*:Buffer.CudaAllocationRoundTrip'
start=$(date +%s)
timeout 420 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 86 \
  "$bin/test_cuda_ops" --gtest_filter="$small" >"$out/memcheck.log" 2>&1
rc_mem=$?
t_mem=$(( $(date +%s) - start ))
start=$(date +%s)
race='Cases/KmeansCase.TensorCoreAssign*:Cases/KmeansCase.TwoIterations*:Cases/KmeansCase.Init*:Cases/SelectCase.*:Select.*:Cases/PermuteCase.*:Graph.*'
race+=':Cases/SparseAttention.*/unit_clusters*:Cases/SparseAttention.*/single_cluster*:Cases/FusedPermutation.*/perm_qk_unit*'
timeout 420 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 86 \
  "$bin/test_cuda_ops" --gtest_filter="$race:$small" >"$out/racecheck.log" 2>&1
rc_race=$?
t_race=$(( $(date +%s) - start ))

summary() { grep -E '^\[  (PASSED|FAILED)  \]|tests ran|ERROR SUMMARY|RACECHECK SUMMARY' "$1" | tail -4 | tr '\n' ' '; }
echo
echo "| run | exit | seconds | summary |"
echo "|---|---|---|---|"
echo "| tests | $rc_test | $t_test | $(summary "$out/test.log") |"
echo "| memcheck | $rc_mem | $t_mem | $(summary "$out/memcheck.log") |"
echo "| racecheck | $rc_race | $t_race | $(summary "$out/racecheck.log") |"
[ $rc_test -eq 0 ] && [ $rc_mem -eq 0 ] && [ $rc_race -eq 0 ]
