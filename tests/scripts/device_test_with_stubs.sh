#!/usr/bin/env bash
# `scripts/device.sh test` end to end on a machine without a GPU: nvidia-smi, compute-sanitizer,
# python3 and test_cuda_ops are stubs on PATH, so what is checked is the script's own work: it
# finds a prebuilt binary flat or under tests/cuda/, writes gpu.txt and every log to $OUT, prints
# the table of the three runs, and its exit status follows the tests'.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

mkdir -p "$tmp/path" "$tmp/flat" "$tmp/tree/tests/cuda"
stub() { printf '#!/usr/bin/env bash\n%s\n' "$2" >"$1" && chmod +x "$1"; }
stub "$tmp/path/nvidia-smi" 'echo "name, driver_version"; echo "Stub GPU, 1.0"'
stub "$tmp/path/python3" 'echo "python stub torch stub"'
stub "$tmp/path/compute-sanitizer" 'echo "========= ERROR SUMMARY: 0 errors"'
stub "$tmp/flat/test_cuda_ops" 'echo "[assign] 1.0 ms"; echo "[  PASSED  ] 3 tests."'
stub "$tmp/tree/tests/cuda/test_cuda_ops" 'echo "[  FAILED  ] 1 test."; exit 1'

run() {  # OUT_NAME BIN_DIR: the subcommand's output in $tmp/OUT_NAME.txt, its exit status returned
  local rc=0
  PATH="$tmp/path:$PATH" OUT="$tmp/$1" bash "$repo/scripts/device.sh" test "$2" >"$tmp/$1.txt" 2>&1 || rc=$?
  return $rc
}

run passing "$tmp/flat" || fail "passing tests: exit $?, output: $(cat "$tmp/passing.txt")"
for f in gpu.txt test.log numbers.txt memcheck.log racecheck.log; do
  [ -e "$tmp/passing/$f" ] || fail "no $f in OUT"
done
grep -q "Stub GPU" "$tmp/passing/gpu.txt" || fail "gpu.txt lacks the GPU: $(cat "$tmp/passing/gpu.txt")"
grep -q "python stub torch stub" "$tmp/passing/gpu.txt" || fail "gpu.txt lacks python and torch"
grep -q '^\[assign\] 1.0 ms' "$tmp/passing/numbers.txt" || fail "numbers.txt lacks the timing line"
grep -q '^| tests | 0 |' "$tmp/passing.txt" || fail "no tests row: $(cat "$tmp/passing.txt")"
grep -q '^| racecheck | 0 |.*ERROR SUMMARY: 0 errors' "$tmp/passing.txt" || fail "no racecheck row"

rc=0
run failing "$tmp/tree" || rc=$?
[ "$rc" -ne 0 ] || fail "failing tests under tests/cuda/: exit 0"
grep -q '^| tests | 1 |.*FAILED' "$tmp/failing.txt" || fail "binary under tests/cuda/ not run: $(cat "$tmp/failing.txt")"
echo "device.sh test: passing and failing stub runs behave"
