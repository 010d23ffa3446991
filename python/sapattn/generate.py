"""Generate a video with a diffusers Wan 2.1 or HunyuanVideo pipeline, with SVG2 or dense.

    python -m sapattn.generate --model DIR --prompt "a cat runs on the beach" --out video.mp4
    python -m sapattn.generate --model DIR --prompt "..." --out dense.mp4 --dense

DIR is a diffusers pipeline folder (model_index.json). The SVG2 settings default to the official
ones for the model and resolution (see --help); --density fixes the budget instead of top-p. Next to
the video go <out>.telemetry.jsonl (per step and layer: density; recall with --measure-recall) and
<out>.json (wall time, settings, mean density). Writing .mp4 needs imageio and imageio-ffmpeg."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sapattn.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--out", required=True, help="video file (.mp4 or .gif)")
    p.add_argument("--dense", action="store_true", help="the stock pipeline, no sapattn (the baseline)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--height", type=int, default=None, help="default: the pipeline's")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--max-sequence-length", type=int, default=None)
    svg2 = p.add_argument_group("SVG2 (defaults: the official settings for the model and resolution)")
    svg2.add_argument("--top-p", type=float)
    svg2.add_argument("--density", type=float, help="fixed budget: keep this share of key clusters per query cluster")
    svg2.add_argument("--q-clusters", type=int)
    svg2.add_argument("--k-clusters", type=int)
    svg2.add_argument("--min-kc-ratio", type=float)
    svg2.add_argument("--first-times-fp", type=float)
    svg2.add_argument("--first-layers-fp", type=float)
    svg2.add_argument("--kmeans-iters-init", type=int)
    svg2.add_argument("--kmeans-iters-step", type=int)
    svg2.add_argument("--kmeans-iters-warmup", type=int)
    svg2.add_argument("--measure-recall", action="store_true", help="also run dense attention to measure recall")
    return p.parse_args(argv)


def default_config(kind: str, height: int, width: int):
    from .config import SVG2Config

    if kind == "hunyuan":
        return SVG2Config.hunyuan_720p()
    return SVG2Config.wan_t2v_720p() if height * width >= 720 * 1280 else SVG2Config.wan_480p()


def config_from_args(args, kind: str, height: int, width: int):
    cfg = default_config(kind, height, width)
    changes = {name: getattr(args, name) for name in ("top_p", "q_clusters", "k_clusters", "min_kc_ratio",
                                                        "first_times_fp", "first_layers_fp", "kmeans_iters_init",
                                                        "kmeans_iters_step", "kmeans_iters_warmup")
               if getattr(args, name) is not None}
    cfg = cfg.replace(**changes)
    return cfg.with_fixed_density(args.density) if args.density is not None else cfg


def model_kind(pipe) -> str:
    name = type(pipe.transformer).__name__
    if name.startswith("Wan"):
        return "wan"
    if name.startswith("HunyuanVideo"):
        return "hunyuan"
    raise SystemExit(f"error: {type(pipe).__name__} has a {name}; sapattn supports Wan 2.1 and HunyuanVideo")


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "model_index.json").is_file():
        print(f"error: {model_dir} is not a diffusers pipeline folder (no model_index.json)", file=sys.stderr)
        return 2
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import export_to_video

    from . import diffusers as sd

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(args.device)
    kind = model_kind(pipe)
    call = {"prompt": args.prompt, "num_inference_steps": args.steps,
            "generator": torch.Generator(device="cpu").manual_seed(args.seed), "output_type": "np"}
    for key, value in (("negative_prompt", args.negative_prompt), ("height", args.height), ("width", args.width),
                       ("num_frames", args.frames), ("guidance_scale", args.guidance_scale),
                       ("max_sequence_length", args.max_sequence_length)):
        if value is not None:
            call[key] = value
    height = args.height or (720 if kind == "hunyuan" else 480)
    width = args.width or (1280 if kind == "hunyuan" else 832)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    telemetry = out.with_suffix(".telemetry.jsonl")
    config = None
    if not args.dense:
        config = config_from_args(args, kind, height, width)
        sd.enable(pipe, config, telemetry=telemetry, measure_recall=args.measure_recall)
    pipe.set_progress_bar_config(disable=False)  # diffusers' own progress bar over the steps

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    frames = pipe(**call).frames[0]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not args.dense:
        sd.disable(pipe)
    export_to_video(list(frames), str(out), fps=args.fps)

    summary = {"model": str(model_dir), "pipeline": type(pipe).__name__, "mode": "dense" if args.dense else "svg2",
               "wall_seconds": seconds, "steps": args.steps, "frames": int(frames.shape[0]),
               "height": int(frames.shape[1]), "width": int(frames.shape[2]), "video": str(out)}
    if config is not None:
        rows = [json.loads(line) for line in telemetry.read_text().splitlines()]
        sparse = [r["density"] for r in rows if r["mode"] == "sparse"]
        summary.update(config=vars(config), telemetry=str(telemetry),
                       mean_sparse_density=sum(sparse) / len(sparse) if sparse else None)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} ({summary['frames']} frames) in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
