#!/usr/bin/env bash
# Makes sure the checkout's virtual environment (.venv, or $SAPATTN_VENV) has what a requirements
# file lists (default: python/requirements-test.txt) and prints the path of its python. Nothing is
# ever installed into the user's own Python: the environment is created with
# --system-site-packages, so a package the user already has in the required range (torch above all)
# is reused instead of downloaded, and one that is missing or out of range is installed into .venv
# only, where it shadows the user's copy. pip never removes a package outside the environment it
# installs into (python/tests/test_environment.py runs this script against a stand-in for the
# user's Python and compares its site-packages before and after).
#
#   PY=$(scripts/bootstrap_python.sh [REQUIREMENTS_FILE])
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-python/requirements-test.txt}
venv=${SAPATTN_VENV:-.venv}
if [ ! -f "$requirements" ]; then
  echo "bootstrap_python: no requirements file $requirements" >&2
  exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "bootstrap_python: python3 is needed (apt-get install python3 python3-venv)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv --system-site-packages "$venv" >&2; then
    rm -rf "$venv"
    echo "bootstrap_python: python3 could not create a virtual environment in $venv" \
      "(on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
py="$PWD/$venv/bin/python"
if ! "$py" -m pip --version >/dev/null 2>&1; then
  echo "bootstrap_python: $venv has no pip (on Debian/Ubuntu: apt-get install python3-venv python3-pip)" >&2
  exit 1
fi
# Which requirements the environment (the venv or, through it, the user's Python) does not meet:
# name and range per line, the ranges compared by python/sapattn/supported_versions.py's rule.
unmet() {
  "$py" - "$requirements" <<'PY'
import importlib.util, re, sys
from importlib.metadata import PackageNotFoundError, version
spec = importlib.util.spec_from_file_location("supported_versions", "python/sapattn/supported_versions.py")
rules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rules)
for line in open(sys.argv[1]):
    req = line.split("#")[0].strip()
    if not req:
        continue
    name, wanted = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)", req).groups()
    try:
        have = version(name)
    except PackageNotFoundError:
        print(f"{name}{wanted} (not installed)")
        continue
    if not rules.satisfies(have, wanted):
        print(f"{name}{wanted} (found {have})")
PY
}
missing=$(unmet)
if [ -n "$missing" ]; then
  printf 'bootstrap_python: installing into %s (torch is large: a few minutes):\n%s\n' "$venv" "$missing" >&2
  "$py" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  missing=$(unmet)
  if [ -n "$missing" ]; then
    printf 'bootstrap_python: pip could not install into %s:\n%s\n' "$venv" "$missing" >&2
    exit 1
  fi
fi
echo "$py"
