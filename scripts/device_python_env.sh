# Sourced by the device scripts: diffusers (and any other wheel in .whl/) into a private folder on
# PYTHONPATH, the prebuilt library named by SAPATTN_TORCH_LIBRARY, python/ on PYTHONPATH.
#   . scripts/device_python_env.sh LIBRARY
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sapattn-site \
    .whl/*.whl && export PYTHONPATH=/tmp/sapattn-site${PYTHONPATH:+:$PYTHONPATH}
fi
export SAPATTN_TORCH_LIBRARY=$1 PYTHONPATH=$PWD/python:${PYTHONPATH:-} PYTHONUNBUFFERED=1
