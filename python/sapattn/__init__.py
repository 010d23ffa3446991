"""sapattn: Sparse VideoGen2 (SVG2) attention for video diffusion transformers, from PyTorch.

    import sapattn
    config = sapattn.SVG2Config()                      # official Wan 2.1 720p settings
    state = sapattn.BranchState()                      # one per layer and CFG branch
    out, lse, density = sapattn.svg2_attention(q, k, v, config, state)   # q, k, v: [B, S, H, D]

sapattn.diffusers.enable(pipe, config) puts it into a Wan 2.1 or HunyuanVideo pipeline."""

from .attention import (BranchState, LayerState, attention_kernel, dense_attention, svg2_attention,
                        warm_centroids)
from ._library import VERSION as __version__
from .config import SVG2Config

__all__ = ["SVG2Config", "BranchState", "LayerState", "svg2_attention", "dense_attention", "warm_centroids",
           "attention_kernel", "__version__"]
