#!/usr/bin/env python3
"""Where the FP8 attention's error comes from (docs/fp8.md): an orientation check in torch.

Dense attention per head of a generator workload in fp32, then the same with one operand at a time
quantised to e4m3 (torch.float8_e4m3fn, round to nearest even, the values kept within +-448 by their
scales): Q and K (per 128-row tile, K smoothed by its mean or not), V (per channel), P (e4m3(P * 448)
against the row maximum, the denominator from the fp32 or from the quantised P). Prints per head the
output's relative L2 change for each, and the softmax-weighted change of the logits (the bias that
makes the FP8 path's LSE low). It is not the op: `sapattn eval --fp8` measures the op itself
(tools/studies/fp8_granularity.py); this only splits the error by source.

    python tools/studies/fp8_error_sources.py /tmp/fp8/wl/tiny-s1
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).float()


def per_tile(x: torch.Tensor, rows: int = 128) -> torch.Tensor:
    out = torch.empty_like(x)
    for r in range(0, x.shape[0], rows):
        amax = x[r:r + rows].abs().max()
        out[r:r + rows] = e4m3(x[r:r + rows] * (448 / amax)) * (amax / 448)
    return out


def per_channel(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(0)
    return e4m3(x * (448 / amax)) * (amax / 448)


def main(workload: Path) -> None:
    with safe_open(str(workload / "workload.safetensors"), "pt") as f:
        q, k, v = (f.get_tensor(name)[0].float() for name in ("q", "k", "v"))
    scale = 1 / math.sqrt(q.shape[-1])
    for h in range(q.shape[0]):
        Q, K, V = q[h], k[h], v[h]
        s = Q @ K.T * scale
        p = torch.softmax(s, 1)
        o = p @ V
        mean = K.mean(0)

        def rel(x: torch.Tensor) -> float:
            return ((x - o).norm() / o.norm()).item()

        def logit_shift(s8: torch.Tensor) -> float:
            return ((s8 - s) * p).sum(1).mean().item()

        s_qk = per_tile(Q) @ per_tile(K).T * scale
        s_qk_smooth = per_tile(Q) @ per_tile(K - mean).T * scale  # + q.mean, the same for every key of a row
        w = torch.exp(s - s.max(1, keepdim=True).values)
        p8 = e4m3(w * 448) / 448
        print(f"head {h}: output change, Q K {rel(torch.softmax(s_qk, 1) @ V):.4f} "
              f"(K smoothed {rel(torch.softmax(s_qk_smooth, 1) @ V):.4f}), V {rel(p @ per_channel(V)):.4f}, "
              f"P {rel(p8 @ V / w.sum(1, keepdim=True)):.4f} (quantised sum {rel(p8 @ V / p8.sum(1, keepdim=True)):.4f}); "
              f"weighted logit change, Q {logit_shift(per_tile(Q) @ K.T * scale):+.4f}, "
              f"K {logit_shift(Q @ per_tile(K).T * scale):+.4f}, "
              f"K smoothed {logit_shift(Q @ (per_tile(K - mean) + mean).T * scale):+.4f}, Q K {logit_shift(s_qk):+.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
