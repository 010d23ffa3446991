"""HunyuanVideo 1.5 (HunyuanVideo15Transformer3DModel, 8.3B, T2V and I2V): SVG2 on the joint
[video | text] attention of its 54 double-stream blocks (layers 0-53). The token refiner keeps its
stock processor.

The blocks' attention is HunyuanVideo's double-stream attention (hunyuan.py's processor serves
both); what differs is the text. The model joins three condition streams per batch item, valid
tokens first, padding last: [valid image, valid ByT5, valid MLLM, padded ...]. So SVG2's text rule
holds as for HunyuanVideo (prompt, then padding) with prompt length = the valid tokens of the three,
which forward_inputs counts from the forward's masks on the host. The image tokens count only for
I2V: for T2V the model zeroes them and masks them out (`is_t2v`, all image_embeds zero).

Settings (default_config): SVG2 has no official HunyuanVideo 1.5 script. HunyuanVideo 1.5 at 720p
(121 frames: 31 x 45 x 80 = 111,600 video tokens, 16 heads x 128) is HunyuanVideo's design at its
token count (118,800), so its official 720p settings apply: 400 query and 1000 key clusters, top-p
0.9, min_kc_ratio 0.10, 10% dense steps, 3% dense layers (1 of 54), 50 / 2 k-means iterations. At
480p (31 x 30 x 53 = 49,290 tokens) the query clusters follow Wan's official 480p script (200 /
1000, at a similar 32,760 tokens)."""

from __future__ import annotations

from ..config import SVG2Config
from .controller import Controller
from .hunyuan import HunyuanVideoSVG2Processor

TRANSFORMERS = ("HunyuanVideo15Transformer3DModel",)  # the diffusers classes this adapter serves
DEFAULT_SIZE = (480, 848)  # height, width of the 480p checkpoint's default generation (target_size 640)


def default_config(height: int, width: int) -> SVG2Config:
    if height * width >= 720 * 1280:
        return SVG2Config.hunyuan_720p()
    return SVG2Config.hunyuan_720p(q_clusters=200)


def _argument(args, kwargs, name: str, index: int):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def forward_inputs(args, kwargs) -> dict:
    """The prompt length of each batch item, on the host before the forward (one read for all
    blocks, none inside the forward): the valid MLLM and ByT5 tokens, plus the image tokens when
    the call is I2V, as HunyuanVideo15Transformer3DModel.forward counts them."""
    mask = _argument(args, kwargs, "encoder_attention_mask", 3)
    mask_2 = _argument(args, kwargs, "encoder_attention_mask_2", 6)
    image = _argument(args, kwargs, "image_embeds", 7)
    if mask is None or mask_2 is None or image is None:
        raise ValueError("sapattn: HunyuanVideo 1.5 needs encoder_attention_mask, encoder_attention_mask_2 and "
                         "image_embeds (zeros for text-to-video), as its pipelines pass them")
    valid = mask.bool().sum(dim=1) + mask_2.bool().sum(dim=1)  # [B]
    image_valid = (image != 0).any().to(valid.dtype) * image.shape[1]  # all tokens or none, as the model's is_t2v
    return {"prompt_lengths": [int(n) for n in (valid + image_valid).tolist()]}


def self_attention_modules(transformer):
    """(layer index, attention module) of the double-stream blocks, in order."""
    return [(i, block.attn) for i, block in enumerate(transformer.transformer_blocks)]


def make_processor(stock, controller: Controller, layer: int):
    return HunyuanVideoSVG2Processor(stock, controller, layer)
