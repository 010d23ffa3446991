"""Small randomly initialised Wan 2.1, HunyuanVideo and HunyuanVideo 1.5 models and a Wan pipeline, built from configs
(no weights are downloaded anywhere). Head dim 64, so that the CUDA kernels run them too."""

from __future__ import annotations

import torch

HEAD_DIM = 64


def wan_transformer(*, layers=4, heads=2, in_channels=16, image_dim=None, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=HEAD_DIM,
                                 in_channels=in_channels, out_channels=16, text_dim=32, freq_dim=64, ffn_dim=128,
                                 num_layers=layers, rope_max_seq_len=64, image_dim=image_dim,
                                 added_kv_proj_dim=heads * HEAD_DIM if image_dim else None).eval()


def hunyuan_transformer(*, double=2, single=2, heads=2, seed=0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                          attention_head_dim=HEAD_DIM, num_layers=double, num_single_layers=single,
                                          num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                                          text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(16, 24, 24)).eval()


def hunyuan15_transformer(*, layers=4, heads=2, seed=0):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                            attention_head_dim=HEAD_DIM, num_layers=layers, num_refiner_layers=1,
                                            text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                                            rope_axes_dim=(16, 24, 24)).eval()


def word_tokenizer(max_length=16):
    """A word-level tokenizer made in memory (the pipeline only needs ids and a mask)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>"] + "a cat dog runs walks on the grass beach red blue fast slow video".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=max_length)


def wan_pipeline(*, layers=4, seed=0):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                               relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return WanPipeline(tokenizer=word_tokenizer(), text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       transformer=wan_transformer(layers=layers, seed=seed + 1))


# Wan latents [B, 16, F, H, W]: 3 x 8 x 8 latent cells, 48 tokens after the 1x2x2 patches.
def wan_inputs(batch=1, *, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 3, 8, 8, generator=g)
    text = torch.randn(batch, 8, 32, generator=g)
    t = torch.full((batch,), 500.0)
    return dict(hidden_states=x.to(device, dtype), timestep=t.to(device), encoder_hidden_states=text.to(device, dtype),
                return_dict=False)


# HunyuanVideo: 3 x 8 x 8 latent tokens (192) + 12 text tokens with per-item prompt lengths.
def hunyuan_inputs(prompt_lengths=(7, 12), *, seed=0, device="cpu", dtype=torch.float32):
    batch = len(prompt_lengths)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 3, 8, 8, generator=g)
    text = torch.randn(batch, 12, 16, generator=g)
    mask = torch.zeros(batch, 12, dtype=torch.bool)
    for b, n in enumerate(prompt_lengths):
        mask[b, :n] = True
    return dict(hidden_states=x.to(device, dtype), timestep=torch.full((batch,), 500.0, device=device),
                encoder_hidden_states=text.to(device, dtype), encoder_attention_mask=mask.to(device),
                pooled_projections=torch.randn(batch, 8, generator=g).to(device, dtype),
                guidance=torch.full((batch,), 6000.0, device=device), return_dict=False)


# HunyuanVideo 1.5: 3 x 8 x 8 latent tokens (192) + 12 MLLM tokens (prompt_lengths of them valid) +
# 6 ByT5 tokens (byt5_lengths valid) + 4 image tokens (zeros: text-to-video, unless image=True).
def hunyuan15_inputs(prompt_lengths=(7, 12), byt5_lengths=None, *, image=False, seed=0, device="cpu",
                     dtype=torch.float32):
    batch = len(prompt_lengths)
    byt5_lengths = byt5_lengths or (2,) * batch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 3, 8, 8, generator=g)
    text = torch.randn(batch, 12, 16, generator=g)
    text_2 = torch.randn(batch, 6, 8, generator=g)
    mask = torch.zeros(batch, 12, dtype=torch.int64)
    mask_2 = torch.zeros(batch, 6, dtype=torch.int64)
    for b, (n, n2) in enumerate(zip(prompt_lengths, byt5_lengths)):
        mask[b, :n] = 1
        mask_2[b, :n2] = 1
    images = torch.randn(batch, 4, 8, generator=g) if image else torch.zeros(batch, 4, 8)
    return dict(hidden_states=x.to(device, dtype), timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
                encoder_hidden_states=text.to(device, dtype), encoder_attention_mask=mask.to(device),
                encoder_hidden_states_2=text_2.to(device, dtype), encoder_attention_mask_2=mask_2.to(device),
                image_embeds=images.to(device, dtype), return_dict=False)
