#!/usr/bin/env bash
# Makes sure python3 has what a requirements file lists (default: python/requirements.txt): pip
# installs what is missing or of another version. Without python3 and pip it says what to install.
#
#   scripts/bootstrap_python.sh [REQUIREMENTS_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-python/requirements-test.txt}
if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
  echo "bootstrap_python: python3 with pip is needed (apt-get install python3 python3-pip)" >&2
  exit 1
fi
# Quick path: every pinned requirement already satisfied, nothing to download.
if python3 - "$requirements" <<'PY'
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
  exit 0
fi
echo "bootstrap_python: installing $requirements with pip (torch is large: a few minutes)" >&2
python3 -m pip install --quiet -r "$requirements" 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import torch, diffusers, transformers" || {
  echo "bootstrap_python: pip could not install $requirements" >&2
  exit 1
}
