"""Generate a video with a diffusers Wan 2.1, HunyuanVideo or HunyuanVideo 1.5 pipeline, with SVG2 or dense.

    python -m sapattn.generate --model DIR --prompt "a cat runs on the beach" --out video.mp4
    python -m sapattn.generate --model DIR --prompt "..." --out dense.mp4 --dense

DIR is a diffusers pipeline folder (model_index.json). The SVG2 settings default to the official
ones for the model and resolution (listed at the end); --density sets the budget instead of top-p,
--method picks SVG2 (sap), SVG-EAR (ear) or ear-plus (docs/ear.md).
Next to the video, with its extension replaced, go video.telemetry.jsonl (per step and layer:
density; recall with --measure-recall) and video.json (wall time, settings, mean density). Writing
.mp4 needs imageio and imageio-ffmpeg."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends each option's help with its default, where it
    has one (argparse.ArgumentDefaultsHelpFormatter would also print "default: None" for options
    whose default the help text describes in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not unset:
            text += " (default: %(default)s)"
        return text


# The SVG2 options and the config fields they set.
_SVG2_FIELDS = ("top_p", "q_clusters", "k_clusters", "min_kc_ratio", "first_times_fp", "first_layers_fp",
                "kmeans_seeding", "kmeans_iters_init", "kmeans_iters_step", "kmeans_iters_warmup")


def _density(text: str) -> float:
    """--density's type: a share in (0, 1], refused before the pipeline loads."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]: the share of query-key pairs computed")
    return value


def _preset_table() -> str:
    """The official SVG2 settings the command starts from, per model and resolution, read from the
    presets themselves."""
    presets = {"Wan 2.1 >= 720p": default_config("wan", 720, 1280), "Wan 2.1 < 720p": default_config("wan", 480, 832),
               "HunyuanVideo": default_config("hunyuan", 720, 1280),
               "HY 1.5 720p": default_config("hunyuan15", 720, 1280),
               "HY 1.5 480p": default_config("hunyuan15", 480, 848)}
    row = "  {:<24}" + "{:<17}" * len(presets)
    lines = ["SVG2 settings, the defaults of the SVG2 options (official for Wan 2.1 and HunyuanVideo;",
             "HunyuanVideo 1.5 (HY 1.5) has none: HunyuanVideo's, docs/torch.md; the first call's k-means",
             "seeding and iterations are sapattn's, docs/cuda.md):", row.format("", *presets)]
    def cell(value) -> str:
        return "scaled*" if value is None else str(value)

    for name in _SVG2_FIELDS:
        lines.append(row.format("--" + name.replace("_", "-"), *(cell(getattr(c, name)) for c in presets.values())))
    lines.append("* one query cluster per 252 video tokens (at most 300), one key cluster per 75.6 (at most 1000)")
    return "\n".join(line.rstrip() for line in lines)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import METHODS

    p = argparse.ArgumentParser(prog="python -m sapattn.generate", description=__doc__, epilog=_preset_table(),
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"sapattn {__version__}")
    p.add_argument("--model", required=True, metavar="DIR", help="diffusers pipeline folder (holds model_index.json)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text prompt")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT", help="negative prompt (default: the pipeline's)")
    p.add_argument("--out", required=True, metavar="VIDEO",
                   help="video file (.mp4 or .gif); the summary and the telemetry go beside it under its name "
                        "with the extension replaced: video.mp4 -> video.json, video.telemetry.jsonl")
    p.add_argument("--dense", action="store_true", help="the stock pipeline, no sapattn (the baseline)")
    p.add_argument("--steps", type=int, metavar="N", default=50, help="denoising steps")
    p.add_argument("--height", type=int, metavar="PX", default=None, help="video height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, metavar="PX", default=None, help="video width in pixels (default: the pipeline's)")
    p.add_argument("--frames", type=int, metavar="N", default=None, help="number of video frames (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, metavar="X", default=None,
                   help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--fps", type=int, metavar="N", default=16, help="frames per second of the written video")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the initial noise, drawn on the CPU")
    p.add_argument("--device", default="cuda", metavar="DEVICE", help="torch device to run on")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the pipeline")
    p.add_argument("--max-sequence-length", type=int, metavar="N", default=None,
                   help="text tokens of the prompt encoding (default: the pipeline's)")
    svg2 = p.add_argument_group("SVG2 (default: the official settings for the model and resolution, listed below)")
    svg2.add_argument("--top-p", type=float, metavar="P", help="share of the estimated attention mass the kept key clusters hold")
    svg2.add_argument("--method", choices=METHODS, default="sap",
                      help="sap: SVG2 (top-p routing); ear: SVG-EAR (error-aware routing within SVG2's area, "
                           "skipped key clusters compensated through their centroids); ear-plus: ear with key "
                           "spread, split key clusters and one budget per head (CPU only so far)")
    svg2.add_argument("--compensate", action="store_true",
                      help="sap: skipped key clusters still count through their centroids (ear and ear-plus always do)")
    svg2.add_argument("--density", type=_density, metavar="D",
                      help="a budget instead of top-p: per head, the top-p whose selection computes this share of "
                           "the video query-key pairs (0 < D <= 1; the same speed for every method)")
    svg2.add_argument("--q-clusters", type=int, metavar="N", help="k-means clusters of the queries, per head")
    svg2.add_argument("--k-clusters", type=int, metavar="N", help="k-means clusters of the keys, per head")
    svg2.add_argument("--min-kc-ratio", type=float, metavar="R", help="least share of key clusters each query cluster keeps")
    svg2.add_argument("--first-times-fp", type=float, metavar="F", help="share of the first denoising steps that stay dense")
    svg2.add_argument("--first-layers-fp", type=float, metavar="F", help="share of the first transformer layers that stay dense")
    svg2.add_argument("--kmeans-seeding", choices=["greedy_pp", "sample"],
                      help="how a layer's first sparse call starts its k-means: greedy k-means++ on 2C sampled tokens "
                           "(sapattn's default), or C sampled tokens (SVG2's official start, with --kmeans-iters-init 50)")
    svg2.add_argument("--kmeans-iters-init", type=int, metavar="N",
                      help="k-means iterations at a layer's first sparse call, after the seeding")
    svg2.add_argument("--kmeans-iters-step", type=int, metavar="N", help="k-means iterations at each later sparse call")
    svg2.add_argument("--kmeans-iters-warmup", type=int, metavar="N",
                      help="k-means iterations during each dense step of a layer that turns sparse later")
    svg2.add_argument("--measure-recall", action="store_true",
                      help="also run dense attention on sparse calls to measure recall (slower)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _adapter(kind: str):
    """sapattn.diffusers' adapter module named `kind` (wan, hunyuan, hunyuan15)."""
    from .diffusers import ADAPTERS

    for adapter in ADAPTERS:
        if adapter.__name__.rsplit(".", 1)[-1] == kind:
            return adapter
    raise ValueError(f"no sapattn.diffusers adapter named {kind!r}")


def default_config(kind: str, height: int, width: int):
    """The model's SVG2 settings at this resolution (its adapter's default_config)."""
    return _adapter(kind).default_config(height, width)


def config_from_args(args, kind: str, height: int, width: int):
    cfg = default_config(kind, height, width)
    changes = {name: getattr(args, name) for name in _SVG2_FIELDS if getattr(args, name) is not None}
    if args.density is not None:
        changes["density"] = args.density
    if args.compensate:
        changes["compensate"] = True
    return cfg.replace(**changes).with_method(args.method)


def model_kind(pipe) -> str:
    """The name of the adapter module that serves the pipeline's transformer."""
    from .diffusers import adapter_for

    try:
        return adapter_for(pipe.transformer).__name__.rsplit(".", 1)[-1]
    except TypeError as e:
        raise SystemExit(f"error: {type(pipe).__name__}: {e}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "model_index.json").is_file():
        print(f"error: {model_dir} is not a diffusers pipeline folder (no model_index.json)", file=sys.stderr)
        return 2
    if Path(args.out).suffix.lower() in (".json", ".jsonl"):
        print(f"error: --out {args.out} names the summary's file type; name the video (.mp4 or .gif)", file=sys.stderr)
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
    height = args.height or _adapter(kind).DEFAULT_SIZE[0]
    width = args.width or _adapter(kind).DEFAULT_SIZE[1]

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
    summary_path = out.with_suffix(".json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    beside = f"{summary_path}" + ("" if args.dense else f", {telemetry}")
    print(f"wrote {out} ({summary['frames']} frames) in {seconds:.1f} s; {beside}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
