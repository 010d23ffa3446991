"""HunyuanVideo: SVG2 on the joint [video | text] attention of the 20 double-stream and 40
single-stream blocks (layers 0-19 and 20-59). The token refiner keeps its stock processor. Text
tokens follow SVG2's joint-text rule with the prompt length read from the forward's text mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import SVG2Config
from .controller import Controller
from .core import SVG2Processor, attend, project_qkv, rope_pairs, split_heads

TRANSFORMERS = ("HunyuanVideoTransformer3DModel",)  # the diffusers classes this adapter serves
DEFAULT_SIZE = (720, 1280)  # height, width of the HunyuanVideo pipeline's default generation


class HunyuanVideoSVG2Processor(SVG2Processor):
    """Replaces HunyuanVideoAttnProcessor2_0 on one block (and HunyuanVideo15AttnProcessor2_0,
    whose double-stream attention is the same but for its mask: hunyuan15.py). Dense calls go to the
    stock processor unchanged (unless the dense path is sapattn's or k-means warms up)."""

    # The legacy Attention module passes only the keyword arguments this signature names.
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        plan = self.controller.plan(self.slot)
        stock_dense = not plan.sparse and plan.warmup_iters == 0 and self.controller.dense_backend == "stock"
        if stock_dense or encoder_hidden_states is None:
            self.controller.record(self.slot, plan)
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if self._parallel_config is not None:
            raise NotImplementedError("sapattn: SVG2 of HunyuanVideo's joint text attention under context "
                                      "parallelism is not supported (Wan is)")

        text = encoder_hidden_states.shape[1]
        joint = attn.add_q_proj is None  # single-stream block: one projection over [video | text]
        if joint:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (split_heads(t, attn.heads) for t in project_qkv(attn, hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # on the video tokens only
            if joint:
                video = query.shape[1] - text
                query = torch.cat([rope_pairs(query[:, :video], *image_rotary_emb), query[:, video:]], dim=1)
                key = torch.cat([rope_pairs(key[:, :video], *image_rotary_emb), key[:, video:]], dim=1)
            else:
                query, key = rope_pairs(query, *image_rotary_emb), rope_pairs(key, *image_rotary_emb)
        if not joint:
            text_q = split_heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            text_k = split_heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            text_v = split_heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(p, dim=1) for p in ((query, text_q), (key, text_k), (value, text_v)))

        prompt = text
        if attention_mask is not None:
            if attention_mask.dim() == 2 and attention_mask.shape[1] == text:
                # HunyuanVideo 1.5 hands the blocks the text's own mask [B, T]: as a key mask over
                # [video | text], [B, 1, 1, N], for the dense calls that do not go to the stock processor.
                attention_mask = F.pad(attention_mask.bool(), (query.shape[1] - text, 0), value=True)[:, None, None, :]
            keys = attention_mask.shape[-1]  # the joint key mask, [B, 1, 1, N]
            if keys != query.shape[1]:
                raise ValueError(f"sapattn: the attention mask covers {keys} keys, the call has "
                                 f"{query.shape[1] - text} video + {text} text tokens")
            prompt = self.controller.forward_inputs["prompt_lengths"]
        out = attend(self.controller, self.slot, plan, query, key, value, text_tokens=text, prompt_length=prompt,
                     key_mask=attention_mask)
        out = out.flatten(2, 3).to(query.dtype)  # [B, S, H, D] -> [B, S, H*D]
        hidden_states, encoder_hidden_states = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def default_config(height: int, width: int) -> SVG2Config:
    """The official HunyuanVideo T2V 720p settings: 400 / 1000 clusters, 10% dense steps."""
    return SVG2Config.hunyuan_720p()


def forward_inputs(args, kwargs) -> dict:
    """Read on the host before each forward (never inside it, so that a compiled forward reads no
    device value): the prompt length of each batch item, the count of True in the forward's
    `encoder_attention_mask` [B, T]. The model's joint mask keeps exactly the first that many text
    tokens (transformer_hunyuan_video.py, effective_condition_sequence_length)."""
    mask = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
    if mask is None:
        return {}
    return {"prompt_lengths": [int(n) for n in mask.reshape(mask.shape[0], -1).sum(dim=1).tolist()]}


def self_attention_modules(transformer):
    """(layer index, attention module) of the double-stream then single-stream blocks."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    return [(i, block.attn) for i, block in enumerate(blocks)]


def make_processor(stock, controller: Controller, layer: int):
    return HunyuanVideoSVG2Processor(stock, controller, layer)
