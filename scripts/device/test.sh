# scripts/device.sh test [BIN_DIR]
#
# GPU tests of every CUDA op against the CPU op, then compute-sanitizer memcheck and racecheck.
#
# Prints a table of the three runs; exits non-zero if anything failed. The sanitizers skip the
# realistic sizes to fit the time.
#
# BIN_DIR (default build-device) holds a prebuilt test_cuda_ops, flat (as the device tool carries
# it, built on the dev machine with -DSAPATTN_CUDA=ON) or under tests/cuda/; without one, this
# configures and builds it in build-device with -DSAPATTN_CUDA_TESTS=ON (needs GoogleTest).
#
# Writes to $OUT or ./device-logs: gpu.txt, test.log, test_cuda_ops.xml, numbers.txt (the figures the
# tests print: labels that differ, rows re-ranked, densities; the tests time nothing), memcheck.log,
# racecheck.log.

# shellcheck shell=bash disable=SC2154  # out, build_dir, wheel_root: set by common.sh

device_main() {
  local exe
  exe=$(binary_or_build test_cuda_ops "${1:-$build_dir}" tests/cuda -DSAPATTN_BUILD_TESTS=ON \
    -DSAPATTN_CUDA_TESTS=ON) || return 1
  describe_gpu

  local start rc_test rc_mem rc_race t_test t_mem t_race
  start=$(date +%s)
  "$exe" --gtest_output="xml:$out/test_cuda_ops.xml" >"$out/test.log" 2>&1
  rc_test=$?
  t_test=$(($(date +%s) - start))
  grep -E '^\[(assign|update|kmeans|select|graph|device)' "$out/test.log" | tee "$out/numbers.txt"

  # The sanitizers skip the realistic sizes (names with "Large", the 75600-token permutation) to fit
  # the time, and the test that asks for a device that does not exist on purpose (the sanitizer
  # reports every failed API call); racecheck runs the suites whose kernels share memory.
  local small='-*Large*:*N75600*:Buffer.CudaAllocationRoundTrip'
  start=$(date +%s)
  timeout 420 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 86 \
    "$exe" --gtest_filter="$small" >"$out/memcheck.log" 2>&1
  rc_mem=$?
  t_mem=$(($(date +%s) - start))
  local race='Cases/KmeansCase.TensorCoreAssign*:Cases/KmeansCase.TwoIterations*:Cases/KmeansCase.Init*:Cases/SelectCase.*:Select.*:Cases/PermuteCase.*:Graph.*'
  race+=':Cases/SparseAttention.*/unit_clusters*:Cases/SparseAttention.*/single_cluster*:Cases/FusedPermutation.*/perm_qk_unit*'
  start=$(date +%s)
  timeout 420 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 86 \
    "$exe" --gtest_filter="$race:$small" >"$out/racecheck.log" 2>&1
  rc_race=$?
  t_race=$(($(date +%s) - start))

  echo
  echo "| run | exit | seconds | summary |"
  echo "|---|---|---|---|"
  echo "| tests | $rc_test | $t_test | $(summary_of "$out/test.log") |"
  echo "| memcheck | $rc_mem | $t_mem | $(summary_of "$out/memcheck.log") |"
  echo "| racecheck | $rc_race | $t_race | $(summary_of "$out/racecheck.log") |"
  [ "$rc_test" -eq 0 ] && [ "$rc_mem" -eq 0 ] && [ "$rc_race" -eq 0 ]
}

# The last lines of a GoogleTest or compute-sanitizer log that say how it went, on one line.
summary_of() {
  grep -E '^\[  (PASSED|FAILED)  \]|tests ran|ERROR SUMMARY|RACECHECK SUMMARY' "$1" | tail -4 | tr '\n' ' '
}
