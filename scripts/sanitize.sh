#!/usr/bin/env bash
# Runs the C++ CPU test suites under sanitizers: AddressSanitizer + UndefinedBehaviorSanitizer
# (build-asan/) and ThreadSanitizer (build-tsan/). Each is a CPU-only build (no CUDA, no torch, no
# benchmark) at -O1 -g with asserts on, and every CTest test runs under it. Any finding fails:
# UBSan is built with -fno-sanitize-recover=undefined, all three halt on their first report (the
# test then fails), ASan and TSan reports (also from the sapattn CLI that test_cli runs as a child
# process) are written to build-<san>/sanitizer-logs/, printed at the end and counted as findings,
# and so is each UBSan "runtime error:" in the test output (UBSan linked with ASan ignores log_path).
#
# Usage: scripts/sanitize.sh [asan|tsan|all]   (default all). Exit status 0 only when every test of
# every requested sanitizer passed and no report was written. docs/testing.md has the details.
set -euo pipefail
cd "$(dirname "$0")/.."

which=${1:-all}
case "$which" in
  asan) sans=(asan) ;;
  tsan) sans=(tsan) ;;
  all) sans=(asan tsan) ;;
  *)
    echo "usage: scripts/sanitize.sh [asan|tsan|all]" >&2
    exit 2
    ;;
esac

bash scripts/bootstrap.sh

# Per test, in seconds: the end-to-end tests (the method comparison, the CLI demo) run about 15x
# (ASan+UBSan) and 50-70x (TSan) slower than in Release, up to 40 minutes on 2 cores, so the CTest
# limit of 600 s is raised; a slow test is run to the end, never skipped. SAPATTN_SANITIZE_TIMEOUT
# overrides it.
timeout=${SAPATTN_SANITIZE_TIMEOUT:-7200}
jobs=$(nproc)
[ "$jobs" -gt 2 ] && jobs=2  # the suites start their own threads; keep the machine responsive

summary=()
status=0
for san in "${sans[@]}"; do
  dir=build-$san
  logs=$PWD/$dir/sanitizer-logs
  case "$san" in
    asan) flags=address,undefined ;;
    tsan) flags=thread ;;
  esac
  start=$SECONDS
  echo "== $san: configure and build $dir (-fsanitize=$flags)" >&2
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g" \
    -DCMAKE_CXX_FLAGS="-fno-sanitize-recover=undefined" -DSAPATTN_SANITIZE="$flags" \
    -DSAPATTN_CUDA=OFF -DSAPATTN_TORCH=OFF -DSAPATTN_BUILD_BENCH=OFF -DSAPATTN_BUILD_TESTS=ON \
    -DSAPATTN_TEST_TIMEOUT="$timeout" >/dev/null
  rm -rf "$logs" "$dir/ctest.log"
  mkdir -p "$logs"
  # Set for the build too: gtest_discover_tests runs each test binary to list its tests.
  export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:strict_init_order=1:check_initialization_order=1:detect_stack_use_after_return=1:log_path=$logs/asan"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:log_path=$logs/tsan"
  build_rc=0
  cmake --build "$dir" -j "$jobs" || build_rc=$?
  ctest_rc=0
  passed=0
  failed=0
  total=0
  if [ "$build_rc" -eq 0 ]; then
    set +e
    ctest --test-dir "$dir" --output-on-failure -j "$jobs" 2>&1 | tee "$dir/ctest.log"
    ctest_rc=${PIPESTATUS[0]}
    set -e
    line=$(grep -E '[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$dir/ctest.log" | tail -n1 || true)
    if [ -n "$line" ]; then
      failed=$(sed -E 's/.* ([0-9]+) tests? failed out of.*/\1/' <<<"$line")
      total=$(sed -E 's/.*out of ([0-9]+).*/\1/' <<<"$line")
      passed=$((total - failed))
    fi
  fi
  ubsan=0
  [ -f "$dir/ctest.log" ] && ubsan=$(grep -c 'runtime error:' "$dir/ctest.log" || true)
  reports=$(($(find "$logs" -type f | wc -l) + ubsan))
  if [ "$(find "$logs" -type f | wc -l)" -gt 0 ]; then
    echo "== $san: sanitizer report files:" >&2
    for f in "$logs"/*; do
      echo "---- $f" >&2
      cat "$f" >&2
    done
  fi
  # The slow ones (over 2 minutes), so a growing test is noticed.
  slow=$(sed -nE 's/.*Test +#[0-9]+: ([^ ]+) \.+.* ([0-9]+)\.[0-9]+ sec$/\2 \1/p' "$dir/ctest.log" 2>/dev/null |
    awk '$1 >= 120 {printf "%s%s %d s", sep, $2, $1; sep=", "}' || true)
  secs=$((SECONDS - start))
  if [ "$build_rc" -ne 0 ]; then
    summary+=("$san: BUILD FAILED (exit $build_rc), $reports report(s), ${secs} s")
    status=1
  else
    summary+=("$san: $passed/$total tests passed, $failed failed, $reports report(s), ctest exit $ctest_rc, ${secs} s")
    if [ -n "$slow" ]; then summary+=("  slow (>= 120 s): $slow"); fi
    if [ "$ctest_rc" -ne 0 ] || [ "$reports" -gt 0 ] || [ "$total" -eq 0 ]; then status=1; fi
  fi
done

echo
echo "sanitize.sh summary:"
for s in "${summary[@]}"; do echo "  $s"; done
exit "$status"
