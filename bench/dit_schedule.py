"""A shortened denoising schedule of a full-size Wan 2.1 transformer (random weights, bf16) in four
stacks, in one run on one GPU: how SVG2 stacks with step caching.

  stock  diffusers' WanTransformer3DModel, SDPA forced to cuDNN
  cache  + MagCache (diffusers' enable_cache) with a fixed skip pattern
  svg2   + sapattn SVG2: the official schedule scaled to the steps (floor(0.2 * steps) dense steps,
         layer 0 dense), a fixed density (random weights give diffuse attention: top-p would keep
         nearly everything, so the budget is set, SVG2Config.with_fixed_density, calibrated once to
         land on --density as bench/dit_forward.py does)
  both   cache + svg2

Each stack is a whole loop as WanPipeline runs it (flow-matching scheduler, classifier-free guidance
as two transformer calls per step inside `cache_context("cond" | "uncond", step_index, sigma, ...)`),
on the same latents and text. Every forward is timed (CUDA events on the GPU, the host clock on the
CPU) and classified: dense, sparse (warm k-means), sparse-init (the first sparse call of each state:
50 k-means iterations) or skipped (the cache ran no block).

The cache's decisions are fixed: MagCache with unit magnitude ratios, which makes it skip after its
retention steps whenever fewer than max_skip_steps consecutive steps have been skipped (random
weights carry no signal to decide on; a real model has calibrated ratios, docs/torch.md). The
pattern is simulated first and checked against what each cached stack did.

Length: one device call is 10 minutes. On an H100 a 14B 720p forward takes about 13 s stock, 7 s
sparse and 16 s with the first k-means, so the default 6 steps with CFG (12 forwards per stack;
dense step 0; the cache computes steps 0, 2, 4) take about 430 s for the four stacks, plus the
model's construction, a warm-up forward and the density calibration. From the per-kind times the
run also projects a 50-step generation with the same rules (10 dense steps; the cache's pattern at
50 steps).

    python3 bench/dit_schedule.py --model wan14b                  # the GPU run (scripts/device.sh bench-stack)
    python3 bench/dit_schedule.py --model tiny --device cpu       # the CPU smoke test (test_bench_schedule.py)

Prints one JSON object per stack, one with the projection, and a markdown table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dit_forward  # noqa: E402  (the full-size Wan configs; bench/ is on the path wherever this runs from)
from harness import cuda_ms, emit, log, read_jsonl  # noqa: E402

STACKS = ("stock", "cache", "svg2", "both")
LETTERS = {"dense": "D", "sparse": "S", "sparse-init": "I", "skipped": "-"}  # the pattern's, per forward
# MagCache's settings: retention 20% of the steps, then at most one skipped step in a row.
RETENTION_RATIO, MAX_SKIP_STEPS = 0.2, 1
DENSE_STEP_SHARE = 0.2  # SVG2's official first_times_fp (Wan 2.1)
TINY = dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=64, ffn_dim=128, num_layers=4, rope_max_seq_len=64),
            latent=(16, 3, 16, 16), text=(16, 32), preset="wan_t2v_720p")


def build(name: str, device: torch.device, dtype: torch.dtype):
    """The transformer (random weights, seeded) and the cond / uncond inputs of every stack."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    if name == "tiny":
        spec, config, text = TINY, TINY["config"], TINY["text"]
    else:
        spec = dit_forward.MODELS[name]
        config, text = dict(dit_forward.COMMON, **spec["config"]), (512, dit_forward.COMMON["text_dim"])
    with device:
        model = WanTransformer3DModel(**config).eval()
    model.to(dtype)
    for module_name, module in model.named_modules():  # as from_pretrained does: these stay float32
        if any(part in module_name.split(".") for part in model._keep_in_fp32_modules):
            module.float()
    g = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, *spec["latent"], device=device, generator=g, dtype=dtype)
    cond = torch.randn(1, *text, device=device, generator=g, dtype=dtype)
    uncond = torch.randn(1, *text, device=device, generator=g, dtype=dtype)
    return model, latents, cond, uncond, spec["preset"]


def magcache_pattern(steps: int, retention_ratio: float = RETENTION_RATIO, max_skip: int = MAX_SKIP_STEPS) -> list:
    """Which steps MagCache computes (True) with unit magnitude ratios, by its rule (diffusers
    hooks/mag_cache.py): every step before int(retention_ratio * steps + 0.5); after that a step is
    skipped while at most max_skip steps in a row have been, once a residual is cached."""
    retention = int(retention_ratio * steps + 0.5)
    computed, in_a_row, cached = [], 0, False
    for step in range(steps):
        compute = True
        if step >= retention:
            in_a_row += 1
            if cached and in_a_row <= max_skip:
                compute = False
            else:
                in_a_row = 0
        computed.append(compute)
        cached = cached or compute
    return computed


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn):
        """(milliseconds, fn's result)."""
        if self.device.type == "cuda":
            return cuda_ms(fn)
        t0 = time.perf_counter()
        result = fn()
        return (time.perf_counter() - t0) * 1e3, result


class CallCounter:
    """Stands in for the last block's self-attention processor and counts its calls: a forward
    that made none is one the cache skipped (every block of a computed step runs)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def run_stack(model, latents, cond, uncond, steps: int, timer: Timer, *, cache: bool, svg2_config=None) -> dict:
    """One generation of `steps` CFG steps; every forward timed and classified."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.hooks import MagCacheConfig

    import sapattn.diffusers as sd

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    if cache:
        model.enable_cache(MagCacheConfig(threshold=0.06, max_skip_steps=MAX_SKIP_STEPS,
                                          retention_ratio=RETENTION_RATIO, num_inference_steps=steps,
                                          mag_ratios=[1.0] * steps))
    pipe = argparse.Namespace(transformer=model, scheduler=scheduler)  # what enable() takes as a pipeline
    controller = sd.enable(pipe, svg2_config) if svg2_config is not None else None
    last = model.blocks[-1].attn1
    counter = last.processor = CallCounter(last.processor)
    forwards = []
    scheduler.set_timesteps(steps)
    wall = time.perf_counter()
    try:
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                context = dict(step_index=i, sigma=float(scheduler.sigmas[i]), num_inference_steps=steps)
                predictions = []
                for branch, text in (("cond", cond), ("uncond", uncond)):
                    before = _svg2_counts(controller)
                    calls = counter.calls
                    with model.cache_context(branch, **context):
                        ms, out = timer(lambda: model(hidden_states=latents, timestep=t.expand(1).to(latents.device),
                                                      encoder_hidden_states=text, return_dict=False)[0])
                    forwards.append(dict(step=i, branch=branch, ms=ms,
                                         kind=_kind(counter.calls - calls, before, _svg2_counts(controller))))
                    predictions.append(out)
                noise = predictions[1] + 5.0 * (predictions[0] - predictions[1])
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        if timer.device.type == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - wall) * 1e3
    finally:
        last.processor = counter.inner
        if controller is not None:
            sd.disable(pipe)  # puts back the processors it saved, under the counter
        if cache:
            model._reset_stateful_cache()
            model.disable_cache()
    return dict(forwards=forwards, wall_ms=wall_ms, finite=bool(torch.isfinite(latents).all()))


def _svg2_counts(controller):
    """(sparse calls, initialised states) so far."""
    if controller is None:
        return 0, 0
    states = [s for layer in controller.layers.values() for s in layer.branches.values()]
    return sum(s.calls for s in states), sum(s.initialized for s in states)


def _kind(block_calls: int, before, after) -> str:
    if block_calls == 0:
        return "skipped"
    if after[1] > before[1]:
        return "sparse-init"
    return "sparse" if after[0] > before[0] else "dense"


def calibrate(model, latents, cond, config, timer: Timer, density: float):
    """The fixed budget's ratio that lands the measured density on `density` (one initialising
    forward, as bench/dit_forward.py): the best-scored clusters are larger than average."""
    import sapattn.diffusers as sd

    folder = Path(tempfile.mkdtemp())
    sd.enable(model, config.replace(first_times_fp=0.0), telemetry=folder / "calibration.jsonl", num_steps=1)
    try:
        with torch.no_grad():
            timer(lambda: model(hidden_states=latents, timestep=torch.tensor([500.0], device=latents.device),
                                encoder_hidden_states=cond, return_dict=False))
    finally:
        sd.disable(model)
    measured = [r["density"] for r in read_jsonl(folder / "calibration.jsonl") if r["mode"] == "sparse"]
    reached = sum(measured) / len(measured)
    return config.replace(min_kc_ratio=min(1.0, density * density / reached)), reached


def summarize(name: str, result: dict, steps: int) -> dict:
    kinds = {}
    for f in result["forwards"]:
        kinds.setdefault(f["kind"], []).append(f["ms"])
    pattern = " ".join("".join(LETTERS[f["kind"]] for f in result["forwards"] if f["step"] == s)
                       for s in range(steps))  # per step, cond then uncond
    return dict(stack=name, steps=steps, forwards=len(result["forwards"]),
                total_ms=sum(f["ms"] for f in result["forwards"]), wall_ms=result["wall_ms"], finite=result["finite"],
                pattern=pattern,
                ms_by_kind={k: statistics.median(v) for k, v in kinds.items()},
                count_by_kind={k: len(v) for k, v in kinds.items()})


def project(rows: dict, steps: int = 50) -> dict:
    """Seconds of a `steps`-step CFG generation per stack from the measured per-kind medians: the
    dense warm-up floor(0.2 * steps) steps, the cache's pattern at that length."""
    stock = rows["stock"]["ms_by_kind"]["dense"]
    skipped = rows["cache"]["ms_by_kind"].get("skipped", 0.0)
    svg2 = rows["svg2"]["ms_by_kind"]
    dense, init, sparse = svg2.get("dense", stock), svg2["sparse-init"], svg2["sparse"]
    dense_steps = int(DENSE_STEP_SHARE * steps)
    computed = magcache_pattern(steps)
    per_step = {
        "stock": [stock] * steps,
        "cache": [stock if c else skipped for c in computed],
        "svg2": [dense if s < dense_steps else init if s == dense_steps else sparse for s in range(steps)],
    }
    both, first_sparse = [], True
    for s, c in enumerate(computed):
        if not c:
            both.append(skipped)
        elif s < dense_steps:
            both.append(dense)
        else:
            both.append(init if first_sparse else sparse)
            first_sparse = False
    per_step["both"] = both
    seconds = {name: 2 * sum(v) / 1e3 for name, v in per_step.items()}  # two forwards per step (CFG)
    return dict(projection_steps=steps, dense_steps=dense_steps, cache_computes=sum(computed),
                seconds=seconds, speedup={name: seconds["stock"] / s for name, s in seconds.items()})


def table(rows: dict, projection: dict) -> str:
    stock = rows["stock"]["total_ms"]
    lines = [f"| stack | forwards by kind (median ms) | pattern (D dense, S sparse, I first sparse, - skipped) | "
             f"schedule s ({rows['stock']['steps']} steps, CFG) | speedup | projected {projection['projection_steps']} "
             "steps s | speedup |", "|---|---|---|---|---|---|---|"]
    for name in STACKS:
        r = rows[name]
        kinds = ", ".join(f"{n} {k} ({r['ms_by_kind'][k]:.0f} ms)" for k, n in sorted(r["count_by_kind"].items()))
        lines.append(f"| {name} | {kinds} | `{r['pattern']}` | {r['total_ms'] / 1e3:.3g} | "
                     f"{stock / r['total_ms']:.2f}x | {projection['seconds'][name]:.3g} | "
                     f"{projection['speedup'][name]:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan14b", choices=sorted(dit_forward.MODELS) + ["tiny"])
    p.add_argument("--steps", type=int, default=6, help="denoising steps, each with CFG (default: 6)")
    p.add_argument("--density", type=float, default=0.15, help="SVG2's fixed density (default: 0.15)")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test, float32)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (a dense step and a sparse one), got {args.steps}")
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density must be in (0, 1], got {args.density}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dit_schedule.py: no CUDA GPU here (--device cpu runs the smoke test)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    import sapattn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    timer = Timer(device)
    log(f"building {args.model} on {device}")
    model, latents, cond, uncond, preset = build(args.model, device, dtype)
    config = getattr(sapattn.SVG2Config, preset)(first_times_fp=DENSE_STEP_SHARE).with_fixed_density(args.density)
    if args.model == "tiny":  # 192 video tokens: a handful of clusters
        config = config.replace(q_clusters=4, k_clusters=16, kmeans_iters_init=10)
    backends = [SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]
    expected = magcache_pattern(args.steps)
    rows = {}
    with sdpa_kernel(backends):
        with torch.no_grad():  # warm-up: kernels chosen and loaded before anything is timed
            model(hidden_states=latents, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=cond,
                  return_dict=False)
        config, reached = calibrate(model, latents, cond, config, timer, args.density)
        log(f"density at the calibrating forward {reached:.3f}; min_kc_ratio {config.min_kc_ratio:.4f}")
        for name in STACKS:
            log(f"stack {name}")
            result = run_stack(model, latents, cond, uncond, args.steps, timer, cache=name in ("cache", "both"),
                               svg2_config=config if name in ("svg2", "both") else None)
            rows[name] = summarize(name, result, args.steps)
            if name in ("cache", "both"):
                computed = [any(f["kind"] != "skipped" for f in result["forwards"] if f["step"] == s)
                            for s in range(args.steps)]
                if computed != expected:
                    raise RuntimeError(f"MagCache computed steps {computed}, its rule says {expected}")
            emit(**rows[name], model=args.model, device=str(torch.cuda.get_device_name() if device.type == "cuda"
                                                             else "cpu"), torch=torch.__version__,
                 date=time.strftime("%Y-%m-%d"), density_target=args.density, min_kc_ratio=config.min_kc_ratio)
    projection = project(rows)
    emit(**projection, model=args.model)
    print(table(rows, projection))
    return 0 if all(r["finite"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
