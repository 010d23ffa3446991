"""The one attention entry point every model adapter calls, and the small tensor helpers the
adapters share (projections, RoPE on interleaved pairs). Tensors are [B, S, H, D] throughout."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..attention import dense_attention, svg2_attention_uncounted, warm_centroids_uncounted
from .controller import CallPlan, Controller, LayerSlot


class SVG2Processor:
    """What every model's SVG2 processor shares: the stock processor it stands in for (dense calls
    go to it), the controller, its layer index, and the attributes diffusers looks for."""

    _attention_backend = None  # read by diffusers' set_attention_backend / enable_parallelism

    def __init__(self, stock, controller: Controller, layer: int) -> None:
        self.stock = stock
        self.controller = controller
        self.layer = layer  # for people; the forward reads the slot (controller.LayerSlot says why)
        self.slot = controller.slots[layer]

    # diffusers' enable_parallelism sets this on whichever processor is installed; the stock
    # processor needs it too, for the dense calls it keeps.
    @property
    def _parallel_config(self):
        return getattr(self.stock, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.stock._parallel_config = value


def project_qkv(attn: torch.nn.Module, hidden_states: torch.Tensor):
    """Self-attention projections of a diffusers attention module, fused or not: [B, S, H*D] each."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))  # [B, S, H*D] -> [B, S, H, D]


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]), the convention of Wan and
    HunyuanVideo in diffusers. x: [B, S, H, D]; cos and sin hold each pair's value twice
    ([c0, c0, c1, c1, ...]) and broadcast against x ([1, S, 1, D]) or are [S, D]. The product is
    taken in cos's precision (float32) and returned in x's dtype. Float32 cos and sin of one row per
    token take sapattn's one-pass op (torch.ops.sapattn.rope_pairs: the same values bit for bit as
    the eager expression, whose six kernels and float32 temporaries move, by count, about 18 times
    x's bytes)."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    fused = _rope_rows(cos, x), _rope_rows(sin, x)
    if fused[0] is not None and fused[1] is not None:
        return torch.ops.sapattn.rope_pairs(x, *fused)
    return rope_pairs_eager(x, cos, sin)


def _rope_rows(t: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
    """t [1, S, 1, D] float32 on x's device as the op's [S, D], or None where the op does not apply."""
    if (t.dtype != torch.float32 or t.device != x.device or t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != 1
            or t.shape[1] != x.shape[1] or t.shape[3] != x.shape[3] or x.dtype not in _ROPE_DTYPES):
        return None
    return t[0, :, 0, :].contiguous()


_ROPE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rope_pairs_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope_pairs in PyTorch's eager ops (cos and sin broadcasting against x)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    # Written into x's dtype half by half: the float32 temporaries are the size of half of x.
    out = torch.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


def _dense(controller: Controller, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if controller.dense_backend == "sapattn" and key_mask is None:
        return dense_attention(q, k, v, scale=controller.config.scale)[0]
    # torch SDPA (cuDNN / flash on the GPU), with the model's key mask when it has one.
    scale = controller.config.scale or None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=key_mask, scale=scale)
    return out.transpose(1, 2)


def attend(controller: Controller, slot: LayerSlot, plan: CallPlan, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, *, text_tokens: int = 0, prompt_length: Union[int, Sequence[int]] = 0,
           key_mask: Optional[torch.Tensor] = None, parallel_config=None) -> torch.Tensor:
    """One layer call as the schedule plans it. q, k, v: [B, S, H, D], the last `text_tokens` of S
    being text (prompt then padding, per batch item). key_mask: the model's own attention mask,
    used by dense calls only (SVG2's text rule replaces it in sparse calls). parallel_config:
    diffusers' ParallelConfig when the model runs with context parallelism (then q, k, v are this
    rank's sequence shard, and sparse calls go through sapattn's own Ulysses over the same ranks)."""
    cfg = controller.config
    if plan.sparse and parallel_config is not None:
        if text_tokens:
            raise NotImplementedError("sapattn: joint text attention under context parallelism is not supported")
        sp = controller.sequence_parallel(parallel_config.context_parallel_config, heads=q.shape[2])
        out = sp.attention(q, k, v, layer=slot.layer, branch=controller.branch)
        controller.record(slot, plan)
        return out
    if plan.sparse:
        state = controller.state(slot)
        want_recall = controller.measure_recall and controller.telemetry_path is not None
        out, lse, density = svg2_attention_uncounted(q, k, v, cfg, state, text_tokens=text_tokens,
                                                     prompt_length=prompt_length, return_lse=want_recall)
        recall = None
        if want_recall:
            # Share of each video query's dense softmax mass that the kept keys hold.
            _, dense_lse = dense_attention(q, k, v, scale=cfg.scale, return_lse=True)
            video = q.shape[1] - text_tokens
            recall = torch.exp(lse - dense_lse)[:, :, :video].mean()
        controller.record(slot, plan, state=state, density=density, recall=recall)
        return out
    if plan.warmup_iters > 0:
        state = controller.state(slot)
        warm_centroids_uncounted(q, k, cfg, state, plan.warmup_iters, text_tokens=text_tokens)
        controller.record(slot, plan, state=state, warm_iters=plan.warmup_iters)
    else:
        controller.record(slot, plan)
    return _dense(controller, q, k, v, key_mask)
