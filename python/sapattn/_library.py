"""Loads the compiled ops (libsapattn_torch.so) into torch.ops.sapattn and registers their fake
implementations, so that torch.compile and meta tensors can trace through them.

The library is looked for, in order: the file named by the environment variable
SAPATTN_TORCH_LIBRARY, then next to this package (where `pip install` puts it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from . import supported_versions

_LIBRARY_NAME = "libsapattn_torch.so"


def _library_path() -> Path:
    explicit = os.environ.get("SAPATTN_TORCH_LIBRARY")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ImportError(f"SAPATTN_TORCH_LIBRARY={explicit} is not a file")
        return path
    path = Path(__file__).resolve().parent / _LIBRARY_NAME
    if not path.is_file():
        raise ImportError(
            f"sapattn's compiled ops ({_LIBRARY_NAME}) are not installed next to {Path(__file__).parent}: "
            "install the package with `pip install --no-build-isolation .` from the sapattn checkout, "
            "or point SAPATTN_TORCH_LIBRARY at a built libsapattn_torch.so"
        )
    return path


def _check_torch_version() -> None:
    """An installed library was compiled against one torch: another torch's ABI differs."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:  # a library named by SAPATTN_TORCH_LIBRARY, or a source checkout
        return
    if TORCH_VERSION != torch.__version__:
        raise ImportError(f"sapattn was built against torch {TORCH_VERSION} but torch {torch.__version__} is installed: "
                          "reinstall sapattn (`pip install --no-build-isolation --force-reinstall .`)")


def _version() -> str:
    """The CMake project version (CMakeLists.txt), the one version of sapattn: recorded in
    _build_info.py by setup.py, or read from the checkout when the package runs from one."""
    try:
        from ._build_info import VERSION
        return VERSION
    except ImportError:
        pass
    cmake_lists = Path(__file__).resolve().parents[2] / "CMakeLists.txt"
    match = re.search(r"project\(\s*sapattn\s+VERSION\s+([0-9][0-9.]*)",
                      cmake_lists.read_text() if cmake_lists.is_file() else "")
    return match.group(1) if match else "unknown"


def _load() -> Path:
    path = _library_path()
    if "SAPATTN_TORCH_LIBRARY" not in os.environ:
        _check_torch_version()
    torch.ops.load_library(str(path))
    return path


# torch outside the tested range: a warning; below the oldest with the APIs called here: ImportError.
supported_versions.check("torch", torch.__version__, supported_versions.TORCH, minimum=supported_versions.TORCH_MINIMUM)
LIBRARY_PATH = _load()
VERSION = _version()


def check_config(config) -> None:
    """The engine's Config::validate on an SVG2Config: every argument of sapattn::check_config is a
    C++ Config field, given from the SVG2Config field of its name where there is one (the call's own,
    such as text_tokens, keep their defaults). Raises ValueError with the engine's message."""
    arguments = torch.ops.sapattn.check_config.default._schema.arguments
    torch.ops.sapattn.check_config(**{a.name: getattr(config, a.name) for a in arguments if hasattr(config, a.name)})


def _bound(op, args, kwargs) -> dict:
    """An op call's arguments by name, the schema's defaults filled in (the dispatcher hands a fake
    kernel only the arguments before a run of trailing defaults)."""
    return {a.name: args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
            for i, a in enumerate(op._schema.arguments)}


@torch.library.register_fake("sapattn::svg2_attention")
def _svg2_attention_fake(*args, **kwargs):
    call = _bound(torch.ops.sapattn.svg2_attention.default, args, kwargs)
    q = call["q"]
    batch, seq, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((batch, heads, seq) if call["return_lse"] else (0,), dtype=torch.float32)
    density = q.new_empty((batch, heads), dtype=torch.float32)
    return out, lse, density


@torch.library.register_fake("sapattn::dense_attention")
def _dense_attention_fake(q, k, v, scale, return_lse):
    batch, seq, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((batch, heads, seq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("sapattn::rope_pairs")
def _rope_pairs_fake(x, cos, sin):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("sapattn::kmeans")
def _kmeans_fake(points, centroids, *args, **kwargs):
    batch, seq, heads, _ = points.shape
    return points.new_empty((batch, heads, seq), dtype=torch.int32)
