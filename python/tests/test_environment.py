"""The test command and the user's Python: scripts/bootstrap_python.sh (what scripts/test.sh, the
README's test command, runs first) installs only into the checkout's .venv, reusing what the user
has in range and shadowing what is out of range, and never changes the user's site-packages; the
supported torch and diffusers ranges are one set of ranges everywhere and are checked at import."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from sapattn import supported_versions as sv

CHECKOUT = Path(__file__).resolve().parents[2]


# -- the ranges ---------------------------------------------------------------------------------

def test_the_ranges_are_the_same_everywhere():
    requirements = {}
    for line in (CHECKOUT / "python/requirements-test.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*([<>=!].*)?$", line.split("#")[0].strip())
        if match:
            requirements[match.group(1)] = match.group(2) or ""
    assert requirements["torch"] == sv.TORCH and requirements["diffusers"] == sv.DIFFUSERS
    pyproject = (CHECKOUT / "pyproject.toml").read_text()
    assert f'diffusers = ["diffusers{sv.DIFFUSERS}"]' in pyproject
    assert f'"diffusers{sv.DIFFUSERS}"]' in pyproject.split("test = ")[1].splitlines()[0]
    for doc in ("docs/torch.md", "README.md", "setup.py", "pyproject.toml"):
        text = (CHECKOUT / doc).read_text()
        for spec in (sv.TORCH, sv.DIFFUSERS):
            assert spec in text, f"{doc} does not give the range {spec}"


@pytest.mark.parametrize("version, spec, inside", [
    ("2.11.0+cu130", sv.TORCH, True), ("2.11", sv.TORCH, True), ("2.11.7", sv.TORCH, True),
    ("2.12.0", sv.TORCH, False), ("2.10.2", sv.TORCH, False), ("2.12.0.dev20260101", sv.TORCH, False),
    ("0.42.1", sv.DIFFUSERS, True), ("0.43.0", sv.DIFFUSERS, False), ("0.41.9", sv.DIFFUSERS, False),
    ("1.0", "", True), ("1.0", "==1", True), ("1.0.1", "!=1.0.1", False), ("3", ">2.9,<=3.0", True),
])
def test_range_rule(version, spec, inside):
    assert sv.satisfies(version, spec) is inside


def test_range_rule_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="unsupported version clause '~=2.11'"):
        sv.satisfies("2.11.0", "~=2.11")
    with pytest.raises(ValueError, match="not a version"):
        sv.satisfies("latest", sv.TORCH)


def _import_with(torch_version=None, diffusers_version=None, module="sapattn"):
    """Imports sapattn (or sapattn.diffusers) in a fresh Python where torch or diffusers claims
    another release, with sapattn's warnings as errors; returns (exit code, stderr)."""
    patch = ["import importlib.metadata as metadata, torch, warnings",
             "warnings.filterwarnings('error', message='sapattn')"]
    if torch_version:
        patch.append(f"torch.__version__ = {torch_version!r}")
    if diffusers_version:
        patch += ["real = metadata.version",
                  f"metadata.version = lambda name: {diffusers_version!r} if name == 'diffusers' else real(name)"]
    patch.append(f"import {module}")
    result = subprocess.run([sys.executable, "-c", "\n".join(patch)], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def test_import_checks_the_torch_release():
    rc, err = _import_with(torch_version="2.15.0")
    assert rc != 0 and f"UserWarning: sapattn is tested with torch{sv.TORCH}; this Python has torch 2.15.0" in err
    rc, err = _import_with(torch_version="2.3.1")
    assert rc != 0 and f"ImportError: sapattn needs torch >= {sv.TORCH_MINIMUM}" in err and "2.3.1" in err
    rc, err = _import_with()  # the tests' own torch is in range: no warning, so no error
    assert rc == 0, err


def test_import_checks_the_diffusers_release():
    rc, err = _import_with(diffusers_version="0.50.0", module="sapattn.diffusers")
    assert rc != 0 and f"sapattn is tested with diffusers{sv.DIFFUSERS}; this Python has diffusers 0.50.0" in err
    rc, err = _import_with(module="sapattn.diffusers")
    assert rc == 0, err


# -- the test command and the user's Python ------------------------------------------------------

def _wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of one module, written by hand (no build backend, no index)."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: sapattn-tests\nRoot-Is-Purelib: true\n"
                               "Tag: py3-none-any\n")}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def _installed(site: Path, name: str, version: str) -> None:
    """A distribution as pip leaves it in a site-packages: the module and its dist-info."""
    module = name.replace("-", "_")
    (site / module).mkdir()
    (site / module / "__init__.py").write_text(f"VERSION = {version!r}\n")
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def _python_installation(root: Path) -> Path:
    """A Python installation at `root` that stands in for the user's: the running interpreter's
    binary and standard library (linked), and an empty site-packages of its own. A virtual
    environment cannot stand in: a venv made from a venv with --system-site-packages sees the
    base installation's site-packages, not the first venv's."""
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "bin").mkdir(parents=True)
    shutil.copy2(Path(getattr(sys, "_base_executable", sys.executable)).resolve(), root / "bin" / name)
    (root / "bin" / "python3").symlink_to(name)
    (root / "bin" / "python").symlink_to(name)
    lib = root / "lib" / name
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name not in ("site-packages", "dist-packages"):
            (lib / entry.name).symlink_to(entry)
    # Its site-packages, wherever this build of Python puts it under the prefix (lib/pythonX.Y/
    # site-packages; Debian's patched site.py names dist-packages folders).
    found = subprocess.run([str(root / "bin" / "python3"), "-c", "import sys, site; print(sys.prefix); "
                            "print(*site.getsitepackages(), sep='\\n')"], capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")})
    prefix, *sites = found.stdout.split("\n")
    assert Path(prefix) == root, f"the stand-in Python's prefix is {prefix}, not {root}"
    site = next(Path(s) for s in sites if s and Path(s).is_relative_to(root))
    site.mkdir(parents=True, exist_ok=True)
    return site


def _snapshot(root: Path) -> dict:
    """Every file under `root`: size, modification time and content hash."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bootstrap_leaves_the_users_python_alone(tmp_path):
    """The real bootstrap script, run on a copy of the checkout whose `python3` is a stand-in for
    the user's Python: it holds one package in the required range (reused, not copied) and one out
    of range (a release in range goes into .venv, shadowing it there only). The stand-in's
    site-packages and scripts are listed before and after two runs: equal, file for file."""
    user = tmp_path / "user"
    user_site = _python_installation(user)
    _installed(user_site, "sapattn-test-in-range", "1.5")
    _installed(user_site, "sapattn-test-out-of-range", "3.1")

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "sapattn-test-out-of-range", "2.5")
    checkout = tmp_path / "checkout"
    for path in ("scripts/bootstrap_python.sh", "python/sapattn/supported_versions.py"):
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CHECKOUT / path, checkout / path)
    (checkout / "requirements.txt").write_text("sapattn-test-in-range>=1,<2\nsapattn-test-out-of-range>=2,<3\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{user / 'bin'}{os.pathsep}{env['PATH']}", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    before = (_snapshot(user_site), _snapshot(user / "bin"))

    def bootstrap():
        result = subprocess.run(["bash", str(checkout / "scripts/bootstrap_python.sh"), "requirements.txt"],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        return Path(result.stdout.strip()), result.stderr

    python, log = bootstrap()
    assert python == checkout / ".venv/bin/python"
    assert "sapattn-test-out-of-range>=2,<3 (found 3.1)" in log and "sapattn-test-in-range" not in log
    again, log = bootstrap()  # everything in range now: nothing to install
    assert again == python and "installing" not in log
    assert (_snapshot(user_site), _snapshot(user / "bin")) == before

    def version_seen_by(py, name):
        return subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                              capture_output=True, text=True, env=env, check=True).stdout.strip()

    assert version_seen_by(python, "sapattn-test-out-of-range") == "2.5"  # the .venv's own copy
    assert version_seen_by(user / "bin/python", "sapattn-test-out-of-range") == "3.1"  # the user's, untouched
    assert version_seen_by(python, "sapattn-test-in-range") == "1.5"  # reused from the user's Python
    (venv_site,) = (checkout / ".venv").glob("lib/python*/site-packages")
    assert not list(venv_site.glob("sapattn_test_in_range*")) and list(venv_site.glob("sapattn_test_out_of_range*"))

    # The listing does see a change to the user's site-packages (so the equality above means something).
    (user_site / "sapattn_test_in_range" / "__init__.py").write_text("VERSION = '1.6'\n")
    assert _snapshot(user_site) != before[0]


def test_the_test_command_installs_through_the_venv_only():
    """scripts/test.sh gets its Python from the bootstrap, and every pip call in it is that
    Python's: nothing reaches the user's own pip."""
    script = (CHECKOUT / "scripts/test.sh").read_text()
    assert re.search(r'^py=\$\(bash scripts/bootstrap_python\.sh', script, re.M)
    calls = [line for line in script.splitlines() if re.search(r"\bpip3?\s+install\b", line)
             and not line.lstrip().startswith("#")]
    assert calls and all('"$py" -m pip install' in line for line in calls), calls
