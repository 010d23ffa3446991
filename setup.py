"""Builds libsapattn_torch.so with the project's CMake build against the installed torch and puts
it inside the sapattn package. Everything else about the package is in pyproject.toml.

Environment:
  SAPATTN_BUILD_DIR   CMake build directory to use (default: build-python); an existing build
                      of the project configured with the PyTorch extension is reused as it is.
  SAPATTN_CUDA        AUTO (default: CUDA when nvcc is found), ON or OFF.
  CMAKE_CUDA_ARCHITECTURES  forwarded to CMake when set (default: the project's, 80;90 + sm_90a)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent


def _run(cmd, **kwargs):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


class BuildWithLibrary(build_py):
    def run(self):
        try:
            import torch
        except ImportError:
            sys.exit("sapattn compiles against the installed PyTorch, which this Python cannot import: install torch "
                     "first, then `pip install --no-build-isolation .` (without --no-build-isolation pip builds in "
                     "an environment that has no torch)")
        build_dir = Path(os.environ.get("SAPATTN_BUILD_DIR", ROOT / "build-python"))
        if not (build_dir / "CMakeCache.txt").exists():
            _run(["bash", "scripts/bootstrap.sh"])
            cmake = ["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DSAPATTN_TORCH=ON",
                     "-DSAPATTN_BUILD_TESTS=OFF", "-DSAPATTN_BUILD_CLI=OFF", "-DSAPATTN_BUILD_BENCH=OFF",
                     f"-DPython3_EXECUTABLE={sys.executable}",
                     f"-DSAPATTN_CUDA={os.environ.get('SAPATTN_CUDA', 'AUTO')}"]
            if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
                cmake.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
            if shutil.which("ninja"):
                cmake += ["-G", "Ninja"]
            _run(cmake)
        _run(["cmake", "--build", build_dir, "--target", "sapattn_torch", "-j", str(os.cpu_count() or 2)])
        super().run()
        target = Path(self.build_lib) / "sapattn"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "python" / "libsapattn_torch.so", target / "libsapattn_torch.so")
        (target / "_build_info.py").write_text(f'TORCH_VERSION = "{torch.__version__}"\n')


class BinaryDistribution(Distribution):
    """The wheel holds a compiled library: tag it for the platform."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
