"""One denoising forward of a full-size Wan 2.1 transformer (random weights, bf16), stock diffusers
with torch SDPA on its cuDNN backend against sapattn, in the same run on the same GPU.

Per model it times (CUDA events, median of --reps after a warm-up):
  stock     the unmodified diffusers transformer, SDPA forced to cuDNN
  no_attn   the same forward with the self-attention replaced by a copy of V: "the rest"
  sparse    sapattn with the official schedule inside a step (layer 0 dense through the stock
            processor, the others SVG2 with 2 warm-started k-means iterations) at a fixed density
            (random weights give diffuse attention: top-p would keep nearly everything, so the
            budget is set through the config, SVG2Config.with_fixed_density)
  init      the first sparse forward (50 k-means iterations from the sample), timed once
  fp8       with --fp8: sparse again with attention_dtype="fp8_e4m3" (the e4m3 kernel on the same
            clusters and budget; docs/fp8.md), after the bf16 sparse forwards
Attention time = forward - no_attn. Peak memory is torch's max allocated during each forward.
The projected 50-step time with CFG (two forwards per step) and 20% dense warm-up:
  stock 100 * stock;  sapattn 2 * (10 * stock + init + 39 * sparse).
Prints one JSON object per model and a markdown table last.

    python3 bench/dit_forward.py --models wan13b,wan14b --density 0.15 [--fp8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SHAPES, cuda_ms, emit, read_jsonl, summarize  # noqa: E402  (bench/harness.py, wherever this is run from)


def wan(shape: str, ffn_dim: int, num_layers: int, preset: str) -> dict:
    """A Wan 2.1 config (diffusers' WanTransformer3DModel) at an attention shape of bench/shapes.json:
    its heads and head dim, and a latent [C, F, H, W] of 81 frames whose 2 x 2 patches make the
    shape's [frames, height, width] grid of tokens."""
    s = SHAPES[shape]
    frames, height, width = s["latent_grid"]
    return dict(config=dict(num_attention_heads=s["heads"], attention_head_dim=s["head_dim"], ffn_dim=ffn_dim,
                            num_layers=num_layers),
                latent=(16, frames, 2 * height, 2 * width), preset=preset)


MODELS = {
    "wan14b": wan("wan14b_720p", ffn_dim=13824, num_layers=40, preset="wan_t2v_720p"),  # 21 x 45 x 80 = 75,600 tokens
    "wan13b": wan("wan13b_480p", ffn_dim=8960, num_layers=30, preset="wan_480p"),  # 21 x 30 x 52 = 32,760 tokens
}
COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def build(name: str):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**COMMON, **MODELS[name]["config"]).eval()
    model.to(torch.bfloat16)
    # As from_pretrained does: these stay float32.
    for module_name, module in model.named_modules():
        if any(part in module_name.split(".") for part in model._keep_in_fp32_modules):
            module.float()
    g = torch.Generator(device="cuda").manual_seed(1)
    latent = MODELS[name]["latent"]
    inputs = dict(hidden_states=torch.randn(1, *latent, device="cuda", generator=g, dtype=torch.bfloat16),
                  timestep=torch.tensor([500.0], device="cuda"),
                  encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", generator=g, dtype=torch.bfloat16),
                  return_dict=False)
    return model, inputs


def timed_forward(model, inputs):
    """(milliseconds, peak GiB, output finite) of one forward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ms, out = cuda_ms(lambda: model(**inputs)[0])
    return ms, torch.cuda.max_memory_allocated() / 2**30, bool(torch.isfinite(out).all())


def median_of(model, inputs, reps):
    timed_forward(model, inputs)  # warm-up
    runs = [timed_forward(model, inputs) for _ in range(reps)]
    return (summarize(r[0] for r in runs)[0], max(r[1] for r in runs), all(r[2] for r in runs),
            [round(r[0], 1) for r in runs])


def mean_sparse_density(telemetry: Path) -> float:
    rows = read_jsonl(telemetry)
    values = [r["density"] for r in rows if r["mode"] == "sparse"]
    return sum(values) / len(values)


def bench(name: str, density: float, reps: int, fp8: bool) -> dict:
    import sapattn
    import sapattn.diffusers as sd
    from sapattn.diffusers import wan as wan_adapter
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, inputs = build(name)
    tokens = inputs["hidden_states"].shape[2] * inputs["hidden_states"].shape[3] * inputs["hidden_states"].shape[4] // 4
    row = dict(model=name, tokens=tokens, density_target=density, device=torch.cuda.get_device_name(),
               torch=torch.__version__, date=time.strftime("%Y-%m-%d"))

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["stock_ms"], row["stock_peak_gib"], row["stock_finite"], row["stock_runs"] = median_of(model, inputs, reps)

        # "The rest": every self-attention replaced by a copy of V (projections, norms, RoPE and
        # everything around the attention still run).
        attend = wan_adapter.attend
        wan_adapter.attend = lambda controller, layer, plan, q, k, v, **kw: v.clone()
        sd.enable(model, sapattn.SVG2Config(first_layers_fp=1.0, first_times_fp=0.0), dense_backend="sapattn")
        try:
            row["no_attn_ms"], _, _, _ = median_of(model, inputs, reps)
        finally:
            sd.disable(model)
            wan_adapter.attend = attend

        # The budget: floor(ratio * Ck) key clusters per query cluster. The best-scored clusters are
        # larger than average, so the ratio is calibrated once on the initialising forward to land
        # the measured density on the target.
        preset = getattr(sapattn.SVG2Config, MODELS[name]["preset"])
        config = preset(first_times_fp=0.0).with_fixed_density(density)
        folder = Path(tempfile.mkdtemp())
        controller = sd.enable(model, config, telemetry=folder / "init.jsonl")
        try:
            row["init_ms"], row["init_peak_gib"], _ = timed_forward(model, inputs)  # 50 iterations
            controller.flush()
            row["density_init"] = mean_sparse_density(folder / "init.jsonl")
            ratio = min(1.0, density * density / row["density_init"])
            controller.config = config.replace(min_kc_ratio=ratio)
            controller.telemetry_path = folder / "sparse.jsonl"
            row["sparse_ms"], row["sparse_peak_gib"], row["sparse_finite"], row["sparse_runs"] = median_of(
                model, inputs, reps)
            controller.flush()
            if fp8:
                controller.config = controller.config.replace(attention_dtype="fp8_e4m3")
                controller.telemetry_path = folder / "fp8.jsonl"
                row["fp8_ms"], row["fp8_peak_gib"], row["fp8_finite"], row["fp8_runs"] = median_of(model, inputs, reps)
                controller.flush()
        finally:
            sd.disable(model)
    row["min_kc_ratio"] = ratio
    row["density_measured"] = mean_sparse_density(folder / "sparse.jsonl")
    rows = read_jsonl(folder / "sparse.jsonl")
    row["sparse_layers"] = len({r["layer"] for r in rows if r["mode"] == "sparse"})
    row["layers"] = MODELS[name]["config"]["num_layers"]
    row["stock_attn_ms"] = row["stock_ms"] - row["no_attn_ms"]
    row["sparse_attn_ms"] = row["sparse_ms"] - row["no_attn_ms"]
    row["speedup"] = row["stock_ms"] / row["sparse_ms"]
    row["attn_speedup"] = row["stock_attn_ms"] / row["sparse_attn_ms"]
    row["peak_ratio"] = row["sparse_peak_gib"] / row["stock_peak_gib"]
    row["projected_50_steps_stock_s"] = 100 * row["stock_ms"] / 1e3
    row["projected_50_steps_sapattn_s"] = 2 * (10 * row["stock_ms"] + row["init_ms"] + 39 * row["sparse_ms"]) / 1e3
    row["projected_speedup"] = row["projected_50_steps_stock_s"] / row["projected_50_steps_sapattn_s"]
    if fp8:
        row["fp8_attn_ms"] = row["fp8_ms"] - row["no_attn_ms"]
        row["fp8_speedup"] = row["stock_ms"] / row["fp8_ms"]
        row["fp8_attn_speedup"] = row["stock_attn_ms"] / row["fp8_attn_ms"]
    del model
    torch.cuda.empty_cache()
    return row


def table(rows) -> str:
    lines = ["| model | tokens | stock ms (attn) | no-attn ms | sapattn ms (attn) | density | speedup (attn) | "
             "peak GiB stock / sapattn | 50 steps stock / sapattn s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['stock_ms']:.0f} ({r['stock_attn_ms']:.0f}) | {r['no_attn_ms']:.0f} | "
            f"{r['sparse_ms']:.0f} ({r['sparse_attn_ms']:.0f}) | {r['density_measured']:.3f} | "
            f"{r['speedup']:.2f}x ({r['attn_speedup']:.2f}x) | {r['stock_peak_gib']:.1f} / {r['sparse_peak_gib']:.1f} | "
            f"{r['projected_50_steps_stock_s']:.0f} / {r['projected_50_steps_sapattn_s']:.0f} "
            f"({r['projected_speedup']:.2f}x) |")
    fp8 = [r for r in rows if "fp8_ms" in r]
    if fp8:
        lines += ["", "| model | sapattn fp8 ms (attn) | speedup (attn) | peak GiB |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['fp8_ms']:.0f} ({r['fp8_attn_ms']:.0f}) | {r['fp8_speedup']:.2f}x "
                  f"({r['fp8_attn_speedup']:.2f}x) | {r['fp8_peak_gib']:.1f} |" for r in fp8]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="wan13b,wan14b")
    p.add_argument("--density", type=float, default=0.15)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fp8", action="store_true", help='also time the sparse forward with attention_dtype="fp8_e4m3"')
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("dit_forward.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for name in args.models.split(","):
        row = bench(name, args.density, args.reps, args.fp8)
        emit(**row)
        rows.append(row)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
