"""The wheel as another machine with the same torch gets it: `pip wheel` from the checkout (reusing
the CMake build of the test command), installed with no package index into a fresh virtual
environment that sees only the torch of this one, imported and run there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

CHECKOUT = Path(__file__).resolve().parents[2]


def _build_dir():
    """The CMake build with the PyTorch extension that the wheel reuses (no second compile)."""
    for candidate in (os.environ.get("SAPATTN_BUILD_DIR"), CHECKOUT / "build", CHECKOUT / "build-python"):
        if candidate and (Path(candidate) / "python" / "libsapattn_torch.so").is_file():
            return Path(candidate).resolve()
    return None


BUILD_DIR = _build_dir()
pytestmark = pytest.mark.skipif(BUILD_DIR is None, reason="no CMake build of the PyTorch extension in the checkout "
                                "(scripts/test.sh makes build/)")


def _clean_env() -> dict:
    """This process's environment without what would point a Python at another sapattn (a source
    checkout on PYTHONPATH, a library named by SAPATTN_TORCH_LIBRARY)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAPATTN_TORCH_LIBRARY")}


def run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_installs_and_runs_in_a_fresh_environment(tmp_path):
    wheels = tmp_path / "wheels"
    build = run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", wheels,
                 CHECKOUT], env=dict(os.environ, SAPATTN_BUILD_DIR=str(BUILD_DIR)))
    # -v shows CMake's progress: Makefiles' "Built target", or Ninja's link line / "no work to do"
    # (setup.py makes a new build dir with Ninja where it is installed).
    assert re.search(r"Built target sapattn_torch|libsapattn_torch\.so|ninja: no work to do",
                     build.stdout + build.stderr), build.stdout[-2000:]

    (wheel,) = wheels.glob("*.whl")
    version = re.search(r"project\(sapattn VERSION ([0-9.]+)", (CHECKOUT / "CMakeLists.txt").read_text())[1]
    # Any Python of this platform: the library uses no Python C API.
    assert re.fullmatch(rf"sapattn-{re.escape(version)}-py3-none-linux_\w+\.whl", wheel.name), wheel.name
    release = torch.__version__.split("+")[0]
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "sapattn/libsapattn_torch.so" in names and "sapattn/_build_info.py" in names
        metadata = z.read(f"sapattn-{version}.dist-info/METADATA").decode()
    assert f"Requires-Dist: torch =={release}" in metadata or f"Requires-Dist: torch=={release}" in metadata

    # A fresh environment whose only other packages are this one's torch and its dependencies.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "torch_of_the_tests.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps", "--force-reinstall",
         "--quiet", wheel])
    check = run([python, "-c", f"""
import importlib.metadata, torch, sapattn
assert sapattn.__file__.startswith({str(venv)!r}), sapattn.__file__
assert sapattn.__version__ == {version!r}
assert importlib.metadata.requires("sapattn")[0].replace(" ", "") == "torch==" + torch.__version__.split("+")[0]
q = torch.randn(1, 40, 2, 64)
out, _ = sapattn.dense_attention(q, q, q)
ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2)
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
print("ok")
"""], cwd=tmp_path, env=_clean_env())
    assert check.stdout.startswith("ok")
