"""Builds libsapattn_torch.so with the project's CMake build against the installed torch and puts
it inside the sapattn package. The rest of the package's description is in pyproject.toml; the
version is the CMake project version (CMakeLists.txt), and the wheel requires the torch release it
was compiled against.

Supported (tested) releases, python/sapattn/supported_versions.py: torch >=2.11,<2.12 and, for
sapattn.diffusers, diffusers >=0.42,<0.43 (the `diffusers` extra). The build works against any
torch from 2.4 and says so when the installed one is outside the range; `import sapattn` then
warns the same way.

    pip install -v --no-build-isolation .          # -v: pip shows CMake's progress, else a spinner
    pip wheel --no-build-isolation --no-deps .     # a wheel for machines with the same torch (docs/torch.md)

All build output goes to one folder, reused by the next install (only what changed is rebuilt):
CMake's build and setuptools' staging (<build dir>/python-package).

Environment:
  SAPATTN_BUILD_DIR   CMake build directory to use (default: build-python in the checkout); an
                      existing build of the project is reused, reconfigured for this Python and
                      its torch with the PyTorch extension on.
  SAPATTN_CUDA        AUTO (default: CUDA when nvcc is found), ON or OFF; for a new build dir.
  CMAKE_CUDA_ARCHITECTURES  forwarded to CMake for a new build dir (default: the project's, 80;90
                      + sm_90a)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:  # setuptools >= 70.1 has the command; older ones take it from the wheel package
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
BUILD_DIR = Path(os.environ.get("SAPATTN_BUILD_DIR", ROOT / "build-python")).resolve()


def project_version() -> str:
    """The one version of sapattn: `project(sapattn VERSION x.y.z)` in CMakeLists.txt."""
    match = re.search(r"project\(\s*sapattn\s+VERSION\s+([0-9][0-9.]*)", (ROOT / "CMakeLists.txt").read_text())
    if match is None:
        sys.exit("setup.py: CMakeLists.txt has no `project(sapattn VERSION x.y.z)`")
    return match.group(1)


def installed_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def supported_versions():
    """python/sapattn/supported_versions.py, loaded by path (the package itself imports torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("supported_versions", ROOT / "python/sapattn/supported_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_requirement() -> list:
    """The torch release this build is compiled against (its ABI is torch's C++ ABI): a wheel then
    installs only beside that release. The local tag (+cu130, +cpu) cannot be pinned in a
    requirement; the import check of sapattn._library compares the full version."""
    torch = installed_torch()
    return [f"torch=={torch.__version__.split('+')[0]}"] if torch is not None else ["torch"]


def _run(cmd, **kwargs):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


class BuildWithLibrary(build_py):
    def run(self):
        torch = installed_torch()
        if torch is None:
            sys.exit("sapattn compiles against the installed PyTorch, which this Python cannot import: install torch "
                     "first, then `pip install --no-build-isolation .` (without --no-build-isolation pip builds in "
                     "an environment that has no torch)")
        versions = supported_versions()
        kind, message = versions.problem("torch", torch.__version__, versions.TORCH, minimum=versions.TORCH_MINIMUM)
        if kind == "too old":
            sys.exit(f"setup.py: {message}")
        print(f"sapattn: building against torch {torch.__version__}; supported (tested): torch{versions.TORCH}, "
              f"diffusers{versions.DIFFUSERS}" + (f"\nsapattn: note: {message}" if message else ""), flush=True)
        # Configured every time: a no-op when nothing changed, and it picks up another Python or
        # torch in a reused folder (the torch paths and ABI are read at configure time).
        cmake = ["cmake", "-S", ROOT, "-B", BUILD_DIR, "-DSAPATTN_TORCH=ON", f"-DPython3_EXECUTABLE={sys.executable}"]
        if not (BUILD_DIR / "CMakeCache.txt").exists():
            _run(["bash", "scripts/bootstrap.sh"])
            cmake += ["-DCMAKE_BUILD_TYPE=Release", "-DSAPATTN_BUILD_TESTS=OFF", "-DSAPATTN_BUILD_CLI=OFF",
                      "-DSAPATTN_BUILD_BENCH=OFF", f"-DSAPATTN_CUDA={os.environ.get('SAPATTN_CUDA', 'AUTO')}"]
            if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
                cmake.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
            if shutil.which("ninja"):
                cmake += ["-G", "Ninja"]
        print(f"sapattn: building libsapattn_torch.so in {BUILD_DIR} (the first build with the CUDA kernels takes "
              "10-20 minutes on 2 cores; `pip install -v` shows its progress)", flush=True)
        _run(cmake)
        _run(["cmake", "--build", BUILD_DIR, "--target", "sapattn_torch", "-j", str(os.cpu_count() or 2)])
        super().run()
        target = Path(self.build_lib) / "sapattn"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUILD_DIR / "python" / "libsapattn_torch.so", target / "libsapattn_torch.so")
        (target / "_build_info.py").write_text(f'VERSION = "{project_version()}"\n'
                                               f'TORCH_VERSION = "{torch.__version__}"\n')


class BinaryDistribution(Distribution):
    """The wheel holds a compiled library: tag it for the platform."""

    def has_ext_modules(self):
        return True


class WheelForAnyPython(bdist_wheel):
    """py3-none-<platform>: the library uses torch's C++ API and no Python C API, so one wheel
    serves every Python that has the torch it was built against."""

    def get_tag(self):
        return "py3", "none", super().get_tag()[2]


setup(version=project_version(), install_requires=torch_requirement(),
      cmdclass={"build_py": BuildWithLibrary, "bdist_wheel": WheelForAnyPython}, distclass=BinaryDistribution,
      options={"build": {"build_base": str(BUILD_DIR / "python-package")}})
