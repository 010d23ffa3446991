#!/usr/bin/env bash
# Runs the C++ suites (CTest) and the Python suite (pytest) N times over the build and the .venv that
# scripts/test.sh made, and prints each test's failure count: a flaky test shows as failing in some
# runs and not in others. Extra arguments go to pytest (e.g. a file or -k EXPR to repeat one part).
#
#   scripts/flaky.sh N [PYTEST_ARGS...]      e.g. scripts/flaky.sh 20, scripts/flaky.sh 50 python/tests/test_parallel.py
#   FLAKY_SUITES=python scripts/flaky.sh 50 python/tests/test_parallel.py   (cpp, python or both: the default)
#
# Exit status 0 only if no test failed in any run. Reports land in out/flaky/ (JUnit XML per run).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:?usage: scripts/flaky.sh N [PYTEST_ARGS...]}
shift
suites=${FLAKY_SUITES:-both}
if [ ! -f build/CTestTestfile.cmake ] || [ ! -x .venv/bin/python ]; then
  echo "flaky.sh: run scripts/test.sh once first (it builds build/ and the .venv this script reuses)" >&2
  exit 1
fi
out=out/flaky
rm -rf "$out"
mkdir -p "$out"
[ $# -gt 0 ] || set -- python/tests
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  if [ "$suites" != python ]; then
    ctest --test-dir build -j "$(nproc)" --output-junit "$PWD/$out/ctest-$i.xml" >"$out/ctest-$i.log" 2>&1 || true
  fi
  if [ "$suites" != cpp ]; then
    .venv/bin/python -m pytest -q -p no:cacheprovider --junitxml="$out/pytest-$i.xml" "$@" >"$out/pytest-$i.log" 2>&1 ||
      true
  fi
  echo "flaky.sh: run $i of $runs done in $(($(date +%s) - start)) s" >&2
done
.venv/bin/python - "$out" "$runs" <<'PY'
import collections, glob, os, sys
import xml.etree.ElementTree as ET

out, runs = sys.argv[1], int(sys.argv[2])
seen, failed = collections.Counter(), collections.Counter()
broken = []  # runs whose report is missing: a crash of the runner itself counts as a failure
for suite in ("ctest", "pytest"):
    logs = sorted(glob.glob(os.path.join(out, f"{suite}-*.log")))
    for log in logs:
        xml = log[:-4] + ".xml"
        if not os.path.exists(xml):
            broken.append(os.path.basename(log))
            continue
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{suite}: {case.get('classname', '')}::{case.get('name')}"
            status = case.get("status")
            if case.find("skipped") is not None or status in ("notrun", "disabled"):
                continue
            seen[name] += 1
            if case.find("failure") is not None or case.find("error") is not None or status == "fail":
                failed[name] += 1
print(f"{len(seen)} tests, {runs} runs each")
for name in sorted(seen):
    if failed[name] or seen[name] != runs:
        print(f"  {failed[name]:3d} failed of {seen[name]:3d} run  {name}")
for b in broken:
    print(f"  no report: {b} (the runner itself failed)")
total = sum(failed.values()) + len(broken)
print(f"failures in all: {total}" + ("" if total else " (no test failed in any run)"))
sys.exit(1 if total else 0)
PY
