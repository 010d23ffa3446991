"""Wan 2.1 (T2V and I2V, 1.3B and 14B): SVG2 on the self-attention of every block (attn1).
Cross-attention (attn2), with the text and, for I2V, the image tokens, keeps the stock processor."""

from __future__ import annotations

import torch

from ..config import SVG2Config
from .controller import Controller
from .core import SVG2Processor, attend, project_qkv, rope_pairs, split_heads

TRANSFORMERS = ("WanTransformer3DModel",)  # the diffusers classes this adapter serves
DEFAULT_SIZE = (480, 832)  # height, width of the Wan pipelines' default generation


class WanSVG2Processor(SVG2Processor):
    """Replaces WanAttnProcessor on one block's attn1. Calls the schedule makes dense go to the
    stock processor unchanged (unless the dense path is sapattn's or k-means warms up)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            # Not the self-attention this processor was installed for: leave it to diffusers.
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        plan = self.controller.plan(self.slot)
        if not plan.sparse and plan.warmup_iters == 0 and self.controller.dense_backend == "stock":
            self.controller.record(self.slot, plan)
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        parallel = self._parallel_config
        if parallel is not None and not plan.sparse:
            raise NotImplementedError("sapattn: under context parallelism the dense calls need dense_backend='stock' "
                                      "and no k-means warm-up")

        query, key, value = project_qkv(attn, hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMSNorm across heads, before the split
        query, key, value = (split_heads(t, attn.heads) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = rope_pairs(query, *rotary_emb), rope_pairs(key, *rotary_emb)
        out = attend(self.controller, self.slot, plan, query, key, value, parallel_config=parallel)
        out = out.flatten(2, 3).type_as(query)  # [B, S, H, D] -> [B, S, H*D]
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def default_config(height: int, width: int) -> SVG2Config:
    """The official SVG2 settings: the 720p script's from 720p up (clusters scaled
    with the tokens), the 480p script's (200 / 1000 clusters) below."""
    return SVG2Config.wan_t2v_720p() if height * width >= 720 * 1280 else SVG2Config.wan_480p()


def self_attention_modules(transformer):
    """(layer index, attn1 module) of every block, in order."""
    return [(i, block.attn1) for i, block in enumerate(transformer.blocks)]


def make_processor(stock, controller: Controller, layer: int):
    return WanSVG2Processor(stock, controller, layer)
