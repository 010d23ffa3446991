"""Shared fixtures: the devices the tests run on and seeded inputs.

Every test runs on the CPU; tests marked with the `device` fixture also run on CUDA when a GPU is
present (scripts/device.sh test-python on the GPU machine). SAPATTN_TEST_DEVICES=cuda restricts a
run to the GPU, so that nothing is counted twice there."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch


# GPU-only tests are not collected without a GPU (rather than collected and skipped).
collect_ignore = [] if torch.cuda.is_available() else ["test_cuda.py"]


def _devices():
    wanted = os.environ.get("SAPATTN_TEST_DEVICES")
    if wanted:
        names = [d.strip() for d in wanted.split(",") if d.strip()]
        if "cuda" in names and not torch.cuda.is_available():
            raise RuntimeError("SAPATTN_TEST_DEVICES asks for cuda but torch sees no GPU")
        return names
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request):
    return torch.device(request.param)


def randn(shape, *, seed, device, dtype=torch.float32):
    """Seeded normal values, made on the CPU so that every device sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def clustered(batch, seq, heads, dim, *, centers, seed, device, dtype=torch.float32, spread=0.3):
    """Tokens around a few centres per head, as queries and keys of a video DiT are: k-means and
    the selection have structure to find. [B, S, H, D]."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(batch, heads, centers, dim, generator=g) * 2.0
    which = torch.randint(0, centers, (batch, heads, seq), generator=g)
    x = torch.gather(means, 2, which[..., None].expand(batch, heads, seq, dim))
    x = x + spread * torch.randn(batch, heads, seq, dim, generator=g)
    return x.transpose(1, 2).contiguous().to(device=device, dtype=dtype)


@contextlib.contextmanager
def svg2_enabled(target, config=None, **kwargs):
    """sapattn.diffusers.enable(target, config, **kwargs) for the body of a with-statement, which
    gets the controller; disable(target) when the body ends, however it ends."""
    import sapattn.diffusers as sd

    controller = sd.enable(target, config, **kwargs)
    try:
        yield controller
    finally:
        sd.disable(target)


def working_dtype(device):
    """The dtype a device's kernels take: bf16 on CUDA, f32 on the CPU (its reference precision)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sdpa(q, k, v, mask=None):
    """Reference attention in float32 for [B, S, H, D] inputs."""
    out = torch.nn.functional.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                                           v.float().transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
