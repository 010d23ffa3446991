"""The torch and diffusers releases sapattn supports, as ranges, and the import-time check.

The PyTorch extension is compiled against whatever torch is installed (setup.py), so a range here
is not an ABI statement: it is what the tests ran with. Inside the range sapattn is tested; outside
it `import sapattn` (torch) and `import sapattn.diffusers` (diffusers) warn once, naming the range
and the release found, and go on. Below TORCH_MINIMUM, whose APIs sapattn calls
(torch.library.register_fake, torch.compiler.is_compiling), the import fails.

The same ranges are written in python/requirements-test.txt (what the test command installs into
its .venv when the user's Python has no release in range), pyproject.toml's optional dependencies
and docs/torch.md; test_environment.py keeps them equal to these.

This file imports nothing but the standard library: setup.py and scripts/bootstrap_python.sh load
it by path, before torch is importable."""

from __future__ import annotations

import re
import warnings
from typing import Optional, Tuple

# Tested: torch 2.11.0 (CPU in CI; +cu130 on H100 and H200), diffusers 0.42.1.
TORCH = ">=2.11,<2.12"
DIFFUSERS = ">=0.42,<0.43"
TORCH_MINIMUM = "2.4"

_CLAUSE = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*([0-9][0-9.]*)\s*$")


def release(version: str) -> Tuple[int, ...]:
    """The numeric release of a version string: "2.11.0+cu130" -> (2, 11, 0); "2.12.0.dev20260101"
    -> (2, 12, 0) (a pre-release counts as its release)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def satisfies(version: str, spec: str) -> bool:
    """Whether `version` is inside `spec`, comma-separated clauses such as ">=2.11,<2.12" (an empty
    spec allows every version). Releases are compared padded with zeros: 2.11 == 2.11.0."""
    have = release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(f"unsupported version clause {clause!r} in {spec!r}")
        op, want = match.group(1), release(match.group(2))
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[op]
        if not ok:
            return False
    return True


def problem(name: str, version: str, spec: str, *, minimum: Optional[str] = None) -> Tuple[str, str]:
    """("ok" | "untested" | "too old", message) for `name` at `version` against its range."""
    if minimum is not None and release(version) < release(minimum):
        return "too old", (f"sapattn needs {name} >= {minimum} (it calls APIs added there) and is tested with "
                           f"{name}{spec}; this Python has {name} {version}: install a {name} in that range")
    if satisfies(version, spec):
        return "ok", ""
    return "untested", (f"sapattn is tested with {name}{spec}; this Python has {name} {version}. It may work "
                        f"(sapattn was compiled against the installed torch), but nothing has tested it: "
                        f"./scripts/test.sh runs the tests with it, or install {name}{spec} (docs/torch.md)")


def check(name: str, version: str, spec: str, *, minimum: Optional[str] = None) -> None:
    """Raises ImportError below `minimum`; warns (once per place) outside the range."""
    kind, message = problem(name, version, spec, minimum=minimum)
    if kind == "too old":
        raise ImportError(message)
    if kind == "untested":
        warnings.warn(message, UserWarning, stacklevel=3)
