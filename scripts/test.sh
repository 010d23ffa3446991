#!/usr/bin/env bash
# Builds sapattn with its tests and runs all of them: the C++ suites through CTest (also in the
# CPU-only configuration, build-cpu/, and against an installed prefix), then the Python
# package (PyTorch ops, diffusers integration, generate command) through pytest. The Python tests
# run in the checkout's virtual environment .venv (scripts/bootstrap_python.sh: it reuses what the
# user's Python has in the supported ranges, torch above all, and installs what is missing or out of
# range into .venv only), and the package is installed there from this checkout. The user's own
# Python is never changed (python/tests/test_environment.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
py=$(bash scripts/bootstrap_python.sh python/requirements-test.txt)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DSAPATTN_TORCH=ON -DPython3_EXECUTABLE="$py" >/dev/null
cmake --build build -j "$(nproc)"
# The package from this checkout, reusing the build above (no second compile).
if ! SAPATTN_BUILD_DIR=build "$py" -m pip install --no-build-isolation --no-deps --force-reinstall . \
  >build/pip-install.log 2>&1; then
  cat build/pip-install.log
  echo "test.sh: installing the sapattn package failed (log above)" >&2
  exit 1
fi
ctest_rc=0
ctest --test-dir build --output-on-failure -j "$(nproc)" || ctest_rc=$?
# The CPU-only configuration, what a machine without nvcc builds (README "Building without CUDA"),
# in its own build dir so that it cannot break unseen again: the whole library, the tests whose
# sources read SAPATTN_HAS_CUDA (label cpu_only) and the package checks against a CPU-only install
# (label package). The other suites compile to the same code in both configurations and ran above.
cmake -S . -B build-cpu -DCMAKE_BUILD_TYPE=Release -DSAPATTN_CUDA=OFF -DSAPATTN_TORCH=OFF -DSAPATTN_BUILD_CLI=OFF \
  >/dev/null
cpu_rc=0
cmake --build build-cpu -j "$(nproc)" --target sapattn_cpu_only_check || cpu_rc=$?
if [ "$cpu_rc" -eq 0 ]; then
  ctest --test-dir build-cpu --output-on-failure -j "$(nproc)" -L 'cpu_only|package' --no-tests=error || cpu_rc=$?
fi
pytest_rc=0
"$py" -m pytest python/tests -q -p no:cacheprovider || pytest_rc=$?
echo "ctest exit $ctest_rc, CPU-only build exit $cpu_rc, pytest exit $pytest_rc"
[ "$ctest_rc" -eq 0 ] && [ "$cpu_rc" -eq 0 ] && [ "$pytest_rc" -eq 0 ]
