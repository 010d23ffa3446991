"""diffusers integration on small random Wan 2.1 and HunyuanVideo models: the dense and the
top-p = 1 sparse paths equal the stock processors, the schedule switches at the right step and
layer, state is kept per layer and CFG branch, a pipeline runs end to end, disable() restores the
stock model exactly. torch.compile and the step caches: test_stacking.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import sapattn
import sapattn.diffusers as sd
import tiny_models
from conftest import svg2_enabled, working_dtype


def everywhere(**changes):
    """A config that makes every call sparse (no dense steps or layers), sized for tiny models."""
    base = sapattn.SVG2Config(q_clusters=4, k_clusters=8, kmeans_iters_init=6, first_times_fp=0.0,
                              first_layers_fp=0.0)
    return base.replace(**changes)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def assert_close_to_stock(model, inputs, make_ours):
    """sapattn's output against the stock model's, by FA3's error model: in float32 both agree to
    float32 rounding; in bf16 sapattn's error against the float32 stock model is at most twice the
    stock bf16 model's (plus a small absolute term for values near zero)."""
    stock = run(model, inputs)
    ours = make_ours()
    if stock.dtype == torch.float32:
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)
        return
    model32 = model.float()
    inputs32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    exact = run(model32, inputs32)
    model.to(stock.dtype)
    limit = 2.0 * (stock.float() - exact).abs().max().item() + 1e-2
    assert (ours.float() - exact).abs().max().item() <= limit


@pytest.mark.parametrize("dense_backend", ["stock", "sapattn"])
def test_wan_dense_path_equals_stock(device, dense_backend):
    dtype = working_dtype(device)
    model = tiny_models.wan_transformer().to(device, dtype)
    inputs = tiny_models.wan_inputs(device=device, dtype=dtype)

    def ours():
        with svg2_enabled(model, everywhere(first_layers_fp=1.0), dense_backend=dense_backend):  # every layer dense
            return run(model, inputs)

    assert_close_to_stock(model, inputs, ours)


def test_wan_sparse_with_top_p_one_equals_stock(device):
    dtype = working_dtype(device)
    model = tiny_models.wan_transformer().to(device, dtype)
    inputs = tiny_models.wan_inputs(batch=2, device=device, dtype=dtype)

    def ours():
        with svg2_enabled(model, everywhere(top_p=1.0)) as controller:
            out = run(model, inputs)
            # Every layer made a sparse call and cached centroids for both batch items.
            assert sorted(controller.layers) == [0, 1, 2, 3]
            assert controller.layers[0].branch(0).q_centroids.shape == (2, 2, 4, tiny_models.HEAD_DIM)
            return out

    assert_close_to_stock(model, inputs, ours)


def test_wan_i2v_cross_attention_stays_stock(device):
    dtype = working_dtype(device)
    model = tiny_models.wan_transformer(image_dim=24, in_channels=36).to(device, dtype)
    inputs = tiny_models.wan_inputs(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    inputs["hidden_states"] = torch.randn(1, 36, 3, 8, 8, generator=g).to(device, dtype)
    inputs["encoder_hidden_states"] = torch.randn(1, 512, 32, generator=g).to(device, dtype)  # Wan's 512 text
    inputs["encoder_hidden_states_image"] = torch.randn(1, 9, 24, generator=g).to(device, dtype)
    stock_cross = [block.attn2.processor for block in model.blocks]

    def ours():
        with svg2_enabled(model, everywhere(top_p=1.0)):
            assert [block.attn2.processor for block in model.blocks] == stock_cross
            assert all(isinstance(block.attn1.processor, sd.wan.WanSVG2Processor) for block in model.blocks)
            return run(model, inputs)

    assert_close_to_stock(model, inputs, ours)


def test_hunyuan_sparse_with_top_p_one_equals_stock(device):
    dtype = working_dtype(device)
    model = tiny_models.hunyuan_transformer().to(device, dtype)
    inputs = tiny_models.hunyuan_inputs(prompt_lengths=(7, 12), device=device, dtype=dtype)
    refiner = [b.attn.processor for b in model.context_embedder.token_refiner.refiner_blocks]

    def ours():
        with svg2_enabled(model, everywhere(top_p=1.0)) as controller:
            out = run(model, inputs)
            assert [b.attn.processor for b in model.context_embedder.token_refiner.refiner_blocks] == refiner
            assert sorted(controller.layers) == [0, 1, 2, 3]  # 2 double-stream + 2 single-stream blocks
            return out

    assert_close_to_stock(model, inputs, ours)


def test_disable_restores_the_stock_model_exactly():
    pipe = tiny_models.wan_pipeline()
    model = pipe.transformer
    stock = [block.attn1.processor for block in model.blocks]
    inputs = tiny_models.wan_inputs()
    before = run(model, inputs)
    sd.enable(pipe, everywhere(top_p=0.5))
    assert "step" in vars(pipe.scheduler)
    sparse = run(model, inputs)
    assert not torch.equal(sparse, before)
    sd.disable(pipe)
    assert [block.attn1.processor for block in model.blocks] == stock
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(run(model, inputs), before)
    with pytest.raises(RuntimeError, match="already enabled"):
        sd.enable(model)
        sd.enable(model)
    sd.disable(model)


def test_disable_releases_the_sequence_parallel_state():
    # The SequenceParallelSVG2 objects hold the context-parallel mesh's process group; a rank can only
    # leave torch.distributed cleanly once they are gone (docs/parallel.md, clean shutdown).
    model = tiny_models.wan_transformer(layers=1, heads=2)
    controller = sd.enable(model, everywhere())
    controller._parallel[0] = object()  # stands for a SequenceParallelSVG2 made by a context-parallel call
    sd.disable(model)
    assert controller._parallel == {}


def test_pipeline_schedule_state_and_telemetry(tmp_path):
    """A short generation with the flow-matching scheduler and CFG (two transformer calls per
    step): dense for the first 2 of 5 steps and the first of 4 layers, sparse after; one state per
    layer and branch; the VAE decodes frames; telemetry has one row per layer call."""
    pipe = tiny_models.wan_pipeline(layers=4)
    telemetry = tmp_path / "telemetry.jsonl"
    cfg = everywhere(top_p=0.9, first_times_fp=0.4, first_layers_fp=0.25, kmeans_iters_warmup=3)
    controller = sd.enable(pipe, cfg, telemetry=telemetry, measure_recall=True)
    g = torch.Generator().manual_seed(0)
    frames = pipe("a cat runs on the grass", negative_prompt="blue", height=64, width=64, num_frames=9,
                  num_inference_steps=5, guidance_scale=5.0, max_sequence_length=16, generator=g,
                  output_type="np").frames
    sd.disable(pipe)
    assert frames.shape == (1, 9, 64, 64, 3) and float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0

    rows = [json.loads(line) for line in telemetry.read_text().splitlines()]
    assert len(rows) == 5 * 2 * 4  # steps x CFG branches x layers
    for r in rows:
        sparse = r["step"] >= 2 and r["layer"] >= 1
        assert r["mode"] == ("sparse" if sparse else "dense"), r
        assert r["branch"] in (0, 1)
        if sparse:
            assert 0.0 < r["density"] <= 1.0 and 0.0 < r["recall"] <= 1.0 + 1e-5
    assert {(r["step"], r["branch"]) for r in rows} == {(s, b) for s in range(5) for b in range(2)}

    assert sorted(controller.layers) == [1, 2, 3]  # the dense layer never clusters
    for layer in controller.layers.values():
        assert sorted(layer.branches) == [0, 1]
        cond, uncond = layer.branches[0], layer.branches[1]
        assert cond.calls == 3 and uncond.calls == 3  # the three sparse steps
        assert cond.warm_iters == 2 * 3  # warmed during the two dense steps
        assert not torch.equal(cond.q_centroids, uncond.q_centroids)


def test_bare_transformer_without_a_step_count_assumes_50_steps():
    # The README's enable() on a bare transformer: nothing says how many steps there are.
    model = tiny_models.wan_transformer(layers=2)
    with svg2_enabled(model, everywhere(first_times_fp=0.1)) as controller:  # floor(0.1 * 50) = 5 dense steps
        with pytest.warns(UserWarning, match="the first 5 steps of a 50-step generation stay dense"):
            run(model, tiny_models.wan_inputs())
        for _ in range(5):
            run(model, tiny_models.wan_inputs())
        assert controller.step == 5 and controller.layers[0].branch(0).calls == 1  # step 5 is the first sparse one


def test_bare_transformer_with_num_steps_needs_no_begin():
    model = tiny_models.wan_transformer(layers=2)
    with svg2_enabled(model, everywhere(first_times_fp=0.5), num_steps=4) as controller:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the step count is known: no warning
            for _ in range(4):
                run(model, tiny_models.wan_inputs())
        assert controller.layers[0].branch(0).calls == 2  # steps 2 and 3


def test_bare_transformer_steps():
    model = tiny_models.wan_transformer(layers=2)
    with svg2_enabled(model, everywhere(first_times_fp=0.5)) as controller:
        controller.begin(4)
        for step in range(4):  # each forward is a step: no end_step() needed
            run(model, tiny_models.wan_inputs())
        assert controller.step == 3
        assert sorted(controller.layers[0].branches) == [0]
        assert controller.layers[0].branch(0).calls == 2  # steps 2 and 3
        controller.begin(4)  # a new generation forgets the state
        assert not controller.layers[0].branches
        for step in range(4):  # ending steps by hand counts each step once
            run(model, tiny_models.wan_inputs())
            controller.end_step()
        assert controller.step == 4 and controller.layers[0].branch(0).calls == 2


def test_bare_transformer_with_two_cfg_calls_per_step():
    model = tiny_models.wan_transformer(layers=2)
    with svg2_enabled(model, everywhere(), branches_per_step=2) as controller:
        for _ in range(3):  # three steps of (cond, uncond)
            run(model, tiny_models.wan_inputs(seed=1))
            run(model, tiny_models.wan_inputs(seed=2))
        assert controller.step == 2
        assert sorted(controller.layers[1].branches) == [0, 1]
        assert [b.calls for b in controller.layers[1].branches.values()] == [3, 3]


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_hunyuan15_sparse_with_top_p_one_equals_stock(device, image):
    """HunyuanVideo 1.5 through the same adapter interface: every double-stream block sparse at
    top-p = 1 equals the stock model. SVG2's text rule lets video queries attend to the prompt keys
    only, so this holds only if the prompt length of each item (valid MLLM + ByT5 tokens, plus the
    image tokens for I2V) is the model's own; the lengths differ per item."""
    dtype = working_dtype(device)
    model = tiny_models.hunyuan15_transformer().to(device, dtype)
    inputs = tiny_models.hunyuan15_inputs(prompt_lengths=(7, 12), byt5_lengths=(2, 5), image=image, device=device,
                                          dtype=dtype)
    refiner = [b.attn.processor for b in model.context_embedder.token_refiner.refiner_blocks]
    masks = []  # the joint text mask the model hands its first block, [B, T]
    spy = model.transformer_blocks[0].register_forward_pre_hook(lambda module, args: masks.append(args[3]))

    def ours():
        with svg2_enabled(model, everywhere(top_p=1.0)) as controller:
            out = run(model, inputs)
            assert [b.attn.processor for b in model.context_embedder.token_refiner.refiner_blocks] == refiner
            assert sorted(controller.layers) == [0, 1, 2, 3]
            assert all(isinstance(m.processor, sd.hunyuan.HunyuanVideoSVG2Processor)
                       for _, m in sd.hunyuan15.self_attention_modules(model))
            images = 4 if image else 0
            assert controller.forward_inputs["prompt_lengths"] == [7 + 2 + images, 12 + 5 + images]
            assert controller.forward_inputs["prompt_lengths"] == masks[-1].sum(dim=1).tolist()
            return out

    try:
        assert_close_to_stock(model, inputs, ours)
    finally:
        spy.remove()


def test_hunyuan15_generation_schedule(tmp_path):
    """A tiny HunyuanVideo 1.5 through a denoising loop with CFG (two calls per step, prompts of
    different lengths): dense for the first 2 of 6 steps and layer 0, two states per sparse layer,
    telemetry rows at the loop's steps; disable() restores the stock processors."""
    from denoise import Generation

    model = tiny_models.hunyuan15_transformer()
    cond = tiny_models.hunyuan15_inputs(prompt_lengths=(7,), seed=0)
    uncond = tiny_models.hunyuan15_inputs(prompt_lengths=(3,), seed=1)
    uncond["hidden_states"] = cond["hidden_states"]
    for inputs in (cond, uncond):
        del inputs["timestep"], inputs["return_dict"]
    generation = Generation(model, cond, uncond)
    stock = [m.processor for _, m in sd.hunyuan15.self_attention_modules(model)]
    telemetry = tmp_path / "telemetry.jsonl"
    controller = sd.enable(generation, everywhere(top_p=0.6, first_times_fp=2 / 6, first_layers_fp=0.25),
                           telemetry=telemetry)
    latents, _ = generation(6)
    sd.disable(generation)
    assert torch.isfinite(latents).all()
    rows = [json.loads(line) for line in telemetry.read_text().splitlines()]
    assert [(r["step"], r["branch"], r["layer"]) for r in rows] == [
        (s, b, layer) for s in range(6) for b in range(2) for layer in range(4)]
    for r in rows:
        assert r["mode"] == ("sparse" if r["step"] >= 2 and r["layer"] >= 1 else "dense"), r
    for layer in (1, 2, 3):
        assert [controller.layers[layer].branch(b).calls for b in (0, 1)] == [4, 4]
    assert [m.processor for _, m in sd.hunyuan15.self_attention_modules(model)] == stock
