#!/usr/bin/env bash
# Makes sure the checkout's virtual environment (.venv) has what a requirements file lists (default:
# python/requirements-test.txt) and prints the path of its python. Nothing is ever installed into the
# user's own Python: the environment is created with --system-site-packages, so a torch the user
# already has in the pinned version is reused instead of downloaded, and anything missing or of
# another version is installed into .venv only (where it shadows the user's copy).
#
#   PY=$(scripts/bootstrap_python.sh [REQUIREMENTS_FILE])
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-python/requirements-test.txt}
venv=${SAPATTN_VENV:-.venv}
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
# Quick path: every pinned requirement already satisfied, nothing to download.
if ! "$py" - "$requirements" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for line in open(sys.argv[1]):
    req = line.split("#")[0].strip()
    if not req:
        continue
    name, _, want = req.partition("==")
    name = name.split(">")[0].split("<")[0].strip()
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if want and have.split("+")[0] != want.strip():
        sys.exit(1)
PY
then
  echo "bootstrap_python: installing $requirements into $venv (torch is large: a few minutes)" >&2
  "$py" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  "$py" -c "import torch, diffusers, transformers" >&2 || {
    echo "bootstrap_python: pip could not install $requirements into $venv" >&2
    exit 1
  }
fi
echo "$py"
