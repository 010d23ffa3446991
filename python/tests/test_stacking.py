"""SVG2 stacked with diffusers' step caches and with torch.compile, on the tiny Wan 2.1 and
HunyuanVideo transformers: 8 denoising steps with classifier-free guidance (two calls per step),
the first 2 steps and layer 0 dense.

For each cache hook (FirstBlockCache, TaylorSeer, MagCache, PyramidAttentionBroadcast) and model:
- the cache alone is run first, with a spy on the stock processors (which layer ran at which step
  and branch, as the loop counts them);
- the cache with SVG2: until the first sparse step the trajectory equals the cache alone bit for
  bit (the dense calls go to the stock processors, so the cache makes the same decisions); each
  call sapattn logs is the call the spy saw, at the step and branch the loop was in, dense or sparse
  as the schedule says; the cache skipped layers in the sparse steps and sapattn made sparse calls
  in others; each state's call count is its layer's sparse calls; a layer the cache skipped keeps
  its centroids through the skipped step;
- after disable(), the stock processors are back and the cache alone gives the first run's result.
torch.compile: a whole CFG generation with fullgraph=True compiles three graphs (Wan, inductor)
and equals eager; HunyuanVideo likewise (aot_eager, prompt lengths per branch); diffusers'
regional compilation (compile_repeated_blocks) of 10 Wan blocks stays within the recompile limit;
with FirstBlockCache the only graph breaks are the cache's own."""

from __future__ import annotations

import collections
import json

import pytest
import torch

import sapattn
import sapattn.diffusers as sd
import tiny_models
from denoise import Generation, spy_on

STEPS = 8
DENSE_STEPS = 2  # first_times_fp 0.25 of 8
BRANCH = {"cond": 0, "uncond": 1}


def svg2_config(**changes):
    return sapattn.SVG2Config(q_clusters=4, k_clusters=8, kmeans_iters_init=6, top_p=0.6,
                              first_times_fp=DENSE_STEPS / STEPS, first_layers_fp=0.25).replace(**changes)


def model_and_inputs(name: str, **sizes):
    """The transformer, its cond and uncond inputs (same latents, other text), its self-attention
    modules. HunyuanVideo's prompts have different lengths per branch (7 and 3 of 12 tokens)."""
    if name == "wan":
        model = tiny_models.wan_transformer(**sizes)
        cond, uncond = tiny_models.wan_inputs(seed=0), tiny_models.wan_inputs(seed=1)
        modules = sd.wan.self_attention_modules(model)
    else:
        model = tiny_models.hunyuan_transformer(**sizes)
        cond = tiny_models.hunyuan_inputs(prompt_lengths=(7,), seed=0)
        uncond = tiny_models.hunyuan_inputs(prompt_lengths=(3,), seed=1)
        modules = sd.hunyuan.self_attention_modules(model)
    uncond["hidden_states"] = cond["hidden_states"]
    for inputs in (cond, uncond):
        del inputs["timestep"], inputs["return_dict"]  # the loop gives them
    return model, cond, uncond, modules


# MagCache's per-step magnitude ratios of the tiny models' residuals, from diffusers' calibration
# mode on the cache-alone loop of this file (MagCacheConfig(calibrate=True, num_inference_steps=8),
# which prints them after a generation; docs/torch.md). Checkpoint- and schedule-specific: a real
# model needs its own.
MAG_RATIOS = {
    "wan": [1.0, 1.00601, 1.00842, 1.00504, 0.99625, 0.99250, 1.00924, 0.99771],
    "hunyuan": [1.0, 1.03017, 0.95350, 1.03010, 0.94478, 1.08057, 0.97854, 0.92033],
}


def cache_config(cache: str, model: str, generation: Generation):
    """Settings under which each cache skips some of the sparse steps' layers and computes others
    on these tiny models (thresholds found by running the cache alone)."""
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig)

    if cache == "first_block":
        return FirstBlockCacheConfig(threshold=0.12 if model == "wan" else 0.45)
    if cache == "taylorseer":
        # diffusers' default patterns match attention modules whose name ends in "attn", which
        # Wan's attn1 does not: Wan needs its self-attention named (docs/torch.md).
        names = [r"blocks\.\d+\.attn1"] if model == "wan" else None
        return TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1,
                                     taylor_factors_dtype=torch.float32, cache_identifiers=names)
    if cache == "mag":
        return MagCacheConfig(threshold=0.06, max_skip_steps=2, retention_ratio=0.25, num_inference_steps=STEPS,
                              mag_ratios=MAG_RATIOS[model])
    assert cache == "pyramid"
    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=3,
                                           spatial_attention_timestep_skip_range=(0, 1001),
                                           current_timestep_callback=lambda: generation.timestep)


class Snapshots:
    """The centroids of every (layer, branch) state after each step."""

    def __init__(self, controller):
        self.controller, self.by_step = controller, []

    def __call__(self, step, latents):
        taken = {}
        for layer, states in self.controller.layers.items():
            for branch, state in states.branches.items():
                if state.initialized:
                    taken[layer, branch] = (state.q_centroids.clone(), state.k_centroids.clone())
        self.by_step.append(taken)


@pytest.mark.parametrize("model_name", ["wan", "hunyuan"])
@pytest.mark.parametrize("cache", ["first_block", "taylorseer", "mag", "pyramid"])
def test_cache_hook_with_svg2(model_name, cache, tmp_path):
    model, cond, uncond, modules = model_and_inputs(model_name)
    generation = Generation(model, cond, uncond)
    model.enable_cache(cache_config(cache, model_name, generation))
    stock = [m.processor for _, m in modules]

    # The cache alone, with a spy on the stock processors.
    alone_calls = spy_on(modules, generation)
    alone, alone_steps = generation(STEPS)
    for (_, m), processor in zip(modules, stock):
        m.processor = processor
    assert torch.isfinite(alone).all()

    # The cache with SVG2. The generation is what enable() takes as a pipeline (transformer and
    # scheduler), so the steps are counted from the scheduler as in a diffusers pipeline.
    telemetry = tmp_path / "telemetry.jsonl"
    controller = sd.enable(generation, svg2_config(), telemetry=telemetry)
    calls = spy_on(modules, generation)
    snapshots = Snapshots(controller)
    stacked, stacked_steps = generation(STEPS, on_step_end=snapshots)
    sd.disable(generation)
    assert torch.isfinite(stacked).all()

    # Until the first sparse step the model is the stock one: same trajectory, same cache decisions.
    for step in range(DENSE_STEPS):
        assert torch.equal(stacked_steps[step], alone_steps[step]), f"step {step} differs from the cache alone"
    assert [c for c in calls if c[0] < DENSE_STEPS] == [c for c in alone_calls if c[0] < DENSE_STEPS]

    # Every call sapattn logged is one the spy saw, at the loop's step and branch, in the schedule's mode.
    rows = [json.loads(line) for line in telemetry.read_text().splitlines()]
    expected = [(step, BRANCH[branch], layer, "sparse" if step >= DENSE_STEPS and layer >= 1 else "dense")
                for step, branch, layer in calls]
    assert [(r["step"], r["branch"], r["layer"], r["mode"]) for r in rows] == expected
    assert all(0.0 < r["density"] <= 1.0 for r in rows)

    # The cache skipped layers of the sparse steps, and sapattn made sparse calls: both happened.
    made = collections.Counter((s, b) for s, b, _ in calls)
    assert any(made[s, b] < len(modules) for s in range(DENSE_STEPS, STEPS) for b in BRANCH), "nothing skipped"
    sparse_rows = collections.Counter((r["layer"], r["branch"]) for r in rows if r["mode"] == "sparse")
    assert sparse_rows, "no sparse call"

    # Per layer and branch: the state counted exactly its sparse calls; a layer that never made one
    # has no centroids; through a step that skipped a layer, its centroids stayed.
    for layer in range(1, len(modules)):
        for branch in BRANCH.values():
            state = controller.layers[layer].branch(branch)
            assert state.calls == sparse_rows[layer, branch], (layer, branch)
            assert state.initialized == (sparse_rows[layer, branch] > 0)
    ran = {(s, BRANCH[b], layer) for s, b, layer in calls}
    kept = 0
    for step in range(DENSE_STEPS + 1, STEPS):
        for key, (q, k) in snapshots.by_step[step - 1].items():
            if (step, key[1], key[0]) not in ran:
                now_q, now_k = snapshots.by_step[step][key]
                assert torch.equal(now_q, q) and torch.equal(now_k, k), f"layer {key[0]} branch {key[1]} step {step}"
                kept += 1
    assert kept > 0, "no initialised state was skipped: the test shows nothing about kept centroids"

    # disable(): the stock processors are back, the cache stays, and it alone gives the first result.
    assert [m.processor for _, m in modules] == stock
    assert model.is_cache_enabled
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert "step" not in vars(generation.scheduler)
    again, _ = generation(STEPS)
    assert torch.equal(again, alone)


def test_wan_pipeline_with_first_block_cache(tmp_path):
    """The stacking case: the tiny Wan pipeline, 8 steps with CFG, FirstBlockCache at 0.2 and SVG2.
    The steps sapattn counts (from the pipeline's scheduler) are the pipeline's own step indices
    (callback_on_step_end), the latents of the dense steps equal FirstBlockCache alone, and the
    call counts add up."""
    from diffusers.hooks import FirstBlockCacheConfig

    def generate(pipe, on_step):
        def callback(p, i, t, kwargs):
            on_step(i, kwargs["latents"].clone())
            return {}

        return pipe("a cat runs on the grass", negative_prompt="blue", height=64, width=64, num_frames=9,
                    num_inference_steps=STEPS, guidance_scale=5.0, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), output_type="latent",
                    callback_on_step_end=callback).frames

    pipe = tiny_models.wan_pipeline(layers=4)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    alone = []
    generate(pipe, lambda i, latents: alone.append(latents))

    telemetry = tmp_path / "telemetry.jsonl"
    controller = sd.enable(pipe, svg2_config(), telemetry=telemetry)
    seen = []  # (the pipeline's step index, rows written by then)

    def on_step(i, latents):
        seen.append((i, len(telemetry.read_text().splitlines())))
        if i < DENSE_STEPS:
            assert torch.equal(latents, alone[i])

    frames = generate(pipe, on_step)
    sd.disable(pipe)
    assert torch.isfinite(frames).all()
    rows = [json.loads(line) for line in telemetry.read_text().splitlines()]
    # Each step's rows are written when the scheduler's step ends, before the pipeline's callback:
    # the rows written between two callbacks carry that callback's step index.
    start = 0
    for i, end in seen:
        assert {r["step"] for r in rows[start:end]} == {i}
        start = end
    assert [i for i, _ in seen] == list(range(STEPS)) and start == len(rows)
    sparse = collections.Counter((r["layer"], r["branch"]) for r in rows if r["mode"] == "sparse")
    assert sum(sparse.values()) > 0 and len(rows) < STEPS * 2 * 4  # sparse calls made, some layers skipped
    for (layer, branch), n in sparse.items():
        assert controller.layers[layer].branch(branch).calls == n


def compile_counters():
    from torch._dynamo.utils import counters

    return counters


def run_generation(model, cond, uncond, config, steps, compiled=None):
    """A CFG generation of a bare transformer with SVG2 (eager, or through `compiled`); returns the
    latents after each step and the per-(layer, branch) sparse call counts."""
    generation = Generation(model, cond, uncond)
    controller = sd.enable(generation, config)
    if compiled is not None:
        generation.transformer = compiled
    try:
        _, trajectory = generation(steps)
    finally:
        generation.transformer = model
        sd.disable(generation)
    calls = {(layer, b): s.calls for layer, st in controller.layers.items() for b, s in st.branches.items()}
    return trajectory, calls


def test_torch_compile_fullgraph_over_a_generation(device):
    """Whole-transformer torch.compile with fullgraph=True across 8 CFG steps: the dense steps, the
    first sparse step and the warm sparse steps are the only three graphs (the step and the branch
    are never guarded on), and the compiled generation equals the eager one."""
    torch._dynamo.reset()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, cond, uncond, _ = model_and_inputs("wan", layers=2)
    model.to(device, dtype)
    cond, uncond = ({k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in d.items()}
                    for d in (cond, uncond))
    config = svg2_config(first_layers_fp=0.5)
    eager, eager_calls = run_generation(model, cond, uncond, config, STEPS)
    counters = compile_counters()
    counters.clear()
    compiled, compiled_calls = run_generation(model, cond, uncond, config, STEPS,
                                              compiled=torch.compile(model, fullgraph=True))
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["graph_break"]
    assert compiled_calls == eager_calls and compiled_calls[1, 0] == STEPS - DENSE_STEPS
    if dtype == torch.float32:
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        return
    # bf16: the dense steps are the stock model's ops, rounded as inductor fuses them; after them the
    # rounding may move a token to another cluster, so the sparse steps are compared as a whole.
    for a, b in zip(eager[:DENSE_STEPS], compiled[:DENSE_STEPS]):
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2)
    for a, b in zip(eager[DENSE_STEPS:], compiled[DENSE_STEPS:]):
        assert ((b.float() - a.float()).norm() / a.float().norm()).item() < 0.05


def test_torch_compile_fullgraph_hunyuan():
    """HunyuanVideo (joint text, prompt lengths per branch read on the host before each forward)
    compiles with fullgraph=True: five graphs for a CFG generation (dense steps; first sparse and
    warm sparse per prompt length), equal to eager. aot_eager: the trace and the fake kernels are
    what is tested here, inductor's code generation is the Wan test's."""
    torch._dynamo.reset()
    model, cond, uncond, _ = model_and_inputs("hunyuan", double=1, single=1)
    config = svg2_config(first_layers_fp=0.5, first_times_fp=0.25)
    steps = 4
    eager, eager_calls = run_generation(model, cond, uncond, config, steps)
    counters = compile_counters()
    counters.clear()
    compiled, compiled_calls = run_generation(model, cond, uncond, config, steps,
                                              compiled=torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] == 5, dict(counters["stats"])
    assert not counters["graph_break"]
    assert compiled_calls == eager_calls and compiled_calls[1, 1] == 3
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_regional_compile_of_repeated_blocks():
    """diffusers' compile_repeated_blocks compiles one block's code for all blocks: 10 Wan blocks
    with SVG2 need four graphs (dense layer; sparse layer in a dense step, first sparse call, warm
    calls), within torch's recompile limit of 8, and equal eager."""
    torch._dynamo.reset()
    model, cond, uncond, _ = model_and_inputs("wan", layers=10)
    config = svg2_config(first_layers_fp=0.1, first_times_fp=0.25)
    steps = 4
    eager, eager_calls = run_generation(model, cond, uncond, config, steps)
    counters = compile_counters()
    counters.clear()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    try:
        compiled, compiled_calls = run_generation(model, cond, uncond, config, steps)
    finally:
        for block in model.blocks:
            block._compiled_call_impl = None  # back to eager for the other tests
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    assert compiled_calls == eager_calls and compiled_calls[9, 1] == 3
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_torch_compile_with_first_block_cache():
    """FirstBlockCache decides on the host (a torch.compiler.disable'd function): the stock model
    breaks the graph there, so fullgraph is not possible with it. With SVG2 on, every graph break
    is the cache's, none is in sapattn, and the result equals eager."""
    from diffusers.hooks import FirstBlockCacheConfig

    torch._dynamo.reset()
    model, cond, uncond, _ = model_and_inputs("wan")
    model.enable_cache(FirstBlockCacheConfig(threshold=0.12))
    config = svg2_config()
    eager, eager_calls = run_generation(model, cond, uncond, config, STEPS)
    counters = compile_counters()
    counters.clear()
    compiled, compiled_calls = run_generation(model, cond, uncond, config, STEPS,
                                              compiled=torch.compile(model, backend="aot_eager"))
    breaks = list(counters["graph_break"])
    assert breaks and all("sapattn" not in reason for reason in breaks), breaks
    assert compiled_calls == eager_calls and sum(compiled_calls.values()) > 0
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_enable_on_an_already_compiled_transformer():
    """enable() and disable() take a torch.compile'd transformer (or a pipeline holding one) as the
    module it wraps: the compiled module then runs SVG2, and the stock model after disable()."""
    torch._dynamo.reset()
    model, cond, uncond, modules = model_and_inputs("wan", layers=2)
    stock = [m.processor for _, m in modules]
    compiled = torch.compile(model, backend="eager")
    inputs = dict(cond, timestep=torch.tensor([500.0]), return_dict=False)
    with torch.no_grad():
        before = compiled(**inputs)[0]
        controller = sd.enable(compiled, svg2_config(first_times_fp=0.0, first_layers_fp=0.0), num_steps=1)
        assert all(isinstance(m.processor, sd.wan.WanSVG2Processor) for _, m in modules)
        sparse = compiled(**inputs)[0]
        sd.disable(compiled)
        after = compiled(**inputs)[0]
    assert controller.layers[1].branch(0).calls == 1 and not torch.equal(sparse, before)
    assert [m.processor for _, m in modules] == stock and torch.equal(after, before)
