"""SVG-EAR and ear-plus from Python (docs/ear.md): the density budget, error-aware routing, the
centroid compensation and the ear-plus fields reach the engine through SVG2Config, the torch op,
the diffusers integration and the generation command; bad values are refused with clear text."""

from __future__ import annotations

import math
import re

import pytest
import torch

import sapattn
import sapattn.diffusers as sd
import tiny_models
from conftest import sdpa, svg2_enabled
from sapattn.generate import build_parser, config_from_args
from test_ops import qkv, small_config

EAR_PLUS_FIELDS = ("ear_spread", "ear_pair_values", "ear_head_budget", "ear_split")


def run(cfg, inputs, return_lse=False):
    """One first call on a fresh state: every config starts from the same seeded k-means sample, so
    runs differ only by what the config changes after the clustering."""
    return sapattn.svg2_attention(*inputs, cfg, sapattn.BranchState(), return_lse=return_lse)


def rel_l2(out, inputs):
    """Mean over (batch item, head) of ||O - O_dense|| / ||O_dense||."""
    exact = sdpa(*inputs)
    diff = (out.float() - exact).pow(2).sum(dim=(1, 3)).sqrt()
    return (diff / exact.pow(2).sum(dim=(1, 3)).sqrt()).mean().item()


@pytest.fixture(scope="module")
def inputs():
    # 6 centres per head, 8 query and 16 key clusters: top-p 0.5 skips most key clusters.
    return qkv(torch.device("cpu"), seq=320)


def test_compensation_adds_the_skipped_mass(inputs):
    cfg = small_config(top_p=0.5, min_kc_ratio=0.0)
    plain, plain_lse, plain_density = run(cfg, inputs, return_lse=True)
    comp, comp_lse, comp_density = run(cfg.replace(compensate=True), inputs, return_lse=True)
    # Same selection (top-p routing): the same pairs are computed exactly ...
    assert torch.equal(plain_density, comp_density)
    # ... and every skipped cluster adds |K_j| exp(q . kbar_j) > 0 to each row's denominator.
    assert torch.all(comp_lse >= plain_lse - 1e-5)
    assert (comp_lse - plain_lse).max().item() > 1e-2
    _, dense_lse = sapattn.dense_attention(*inputs, return_lse=True)
    assert (comp_lse - dense_lse).abs().mean() < (plain_lse - dense_lse).abs().mean()
    assert rel_l2(comp, inputs) < rel_l2(plain, inputs)


def test_error_aware_routing_changes_the_selection(inputs):
    cfg = small_config(top_p=0.5, min_kc_ratio=0.0)
    top_p = run(cfg, inputs)[0]
    error_aware = run(cfg.replace(routing="error_aware"), inputs)[0]
    assert not torch.equal(top_p, error_aware)
    ear = run(cfg.with_method("ear"), inputs)[0]
    # EAR (routing plus compensation) within SVG2's area errs less than SVG2 here.
    assert rel_l2(ear, inputs) < rel_l2(top_p, inputs)


@pytest.mark.parametrize("target", [0.15, 0.3])
def test_density_budget_meets_the_requested_density(inputs, target):
    # top_p 0.99 alone would compute far more: the budget replaces it.
    cfg = small_config(top_p=0.99, min_kc_ratio=0.0)
    unbudgeted = run(cfg, inputs)[2]
    density = run(cfg.replace(density=target), inputs)[2]
    assert unbudgeted.mean().item() > target + 0.1
    # Per head the smallest top-p whose selection reaches the target: at least the target, and
    # above it by at most about one key cluster per query cluster (16 key clusters: 1/16 each).
    assert torch.all(density >= target - 1e-6)
    assert torch.all(density <= target + 1.0 / 16 + 0.05), density


def test_density_budget_applies_to_ear_too(inputs):
    cfg = small_config(top_p=0.99, min_kc_ratio=0.0, density=0.25).with_method("ear")
    density = run(cfg, inputs)[2]
    assert torch.all(density >= 0.25 - 1e-6) and torch.all(density <= 0.25 + 0.12), density


@pytest.mark.parametrize("field, value", [("ear_gamma", 0.0), ("ear_keep_ratio", 0.5)] +
                         [(name, True) for name in EAR_PLUS_FIELDS])
def test_every_ear_field_reaches_the_engine(inputs, field, value):
    base = small_config(top_p=0.5, min_kc_ratio=0.0).with_method("ear")
    changed = base.replace(**{field: value})
    assert not torch.equal(run(base, inputs)[0], run(changed, inputs)[0]), field


def test_with_method_matches_the_command_line_methods(inputs):
    cfg = small_config(top_p=0.6, density=0.3, compensate=True)
    assert cfg.with_method("sap") == cfg  # SVG2 with compensation, the budget kept
    ear = cfg.with_method("ear")
    assert (ear.routing, ear.compensate, ear.ear_plus, ear.density) == ("error_aware", True, False, 0.3)
    plus = cfg.with_method("ear-plus")  # eval::use_ear_plus: spread, split, one budget per head
    assert (plus.ear_spread, plus.ear_split, plus.ear_head_budget, plus.ear_pair_values) == (True, True, True, False)
    assert plus.with_method("ear") == ear and plus.with_method("sap") == cfg
    out = run(plus.replace(top_p=0.5, density=0.0), inputs)[0]  # ear-plus runs on the CPU
    assert torch.isfinite(out).all()
    assert rel_l2(out, inputs) < rel_l2(run(ear.replace(top_p=0.5, density=0.0), inputs)[0], inputs) * 1.5


@pytest.mark.parametrize("changes, message", [
    (dict(density=-0.1), r"density must be in \[0, 1\] \(0 = use top_p\), got -0.1"),
    (dict(density=1.5), r"density must be in \[0, 1\]"),
    (dict(density=math.nan), r"density must be in \[0, 1\]"),
    (dict(routing="ear"), r"routing must be 'top_p' or 'error_aware', got 'ear'"),
    (dict(ear_gamma=-1.0), r"ear_gamma must be finite and >= 0, got -1"),
    (dict(ear_gamma=math.inf), r"ear_gamma must be finite"),
    (dict(ear_keep_ratio=1.5), r"ear_keep_ratio must be in \[0, 1\], got 1.5"),
    (dict(ear_head_budget=True), r"ear_spread, .* refine error-aware routing: they need routing ErrorAware "
                                 r"\('error_aware' in Python, where SVG2Config.with_method\('ear-plus'\) sets them all\)"),
    (dict(ear_split=True, routing="error_aware"), r"ear_spread, .* change the compensation: they need compensate = true"),
    (dict(ear_spread=True, routing="error_aware"), r"ear_spread, .* change the compensation: they need compensate = true"),
    (dict(top_p=0.0), r"InvalidArgumentError: top_p must be in \(0, 1\], got 0"),
    (dict(kmeans_iters_step=-1), r"InvalidArgumentError: kmeans_iters_step must be >= 0, got -1"),
])
def test_bad_method_fields_raise_value_error(changes, message):
    """A bad engine field fails at construction with the engine's own message (one rule, one text)."""
    with pytest.raises(ValueError, match=message):
        small_config(**changes)


def test_bad_host_fields_raise_value_error():
    with pytest.raises(ValueError, match=r"SVG2Config: first_times_fp must be in \[0, 1\], got 1.5"):
        small_config(first_times_fp=1.5)
    with pytest.raises(ValueError, match=r"SVG2Config: q_clusters must be None or >= 1, got 0"):
        small_config(q_clusters=0)


def test_unknown_method_and_engine_side_errors(inputs):
    with pytest.raises(ValueError, match=r"method must be one of 'sap', 'ear', 'ear-plus', got 'svg-ear'"):
        small_config().with_method("svg-ear")
    q, k, v = inputs
    qc, kc = torch.zeros(2, 3, 8, 64), torch.zeros(2, 3, 16, 64)
    with pytest.raises(ValueError, match="routing must be 'top_p' or 'error_aware', got 'ear'"):
        torch.ops.sapattn.svg2_attention(q, k, v, qc, kc, True, 0.9, 0.1, 2, 2, 0, 0, 0, 0.0, False, False,
                                         routing="ear")
    # A key shard cannot tell a skipped cluster from one another shard owns: compensation refuses.
    state = sapattn.BranchState()
    with pytest.raises(ValueError, match=r"InvalidArgumentError: compensate needs the whole key set"):
        sapattn.svg2_attention(q, k, v, small_config(compensate=True), state, key_shard=(0, 2))
    assert not state.initialized


def test_opcheck_with_the_method_arguments(inputs):
    q, k, v = (t[:1, :96] for t in inputs)
    qc, kc = torch.zeros(1, 3, 8, 64), torch.zeros(1, 3, 16, 64)
    args = (q, k, v, qc, kc, True, 0.9, 0.1, 4, 2, 0, 0, 0, 0.0, False, True, 0, 1, None, 0.3, "error_aware", True,
            1.0, 0.05, True, False, True, True)
    torch.library.opcheck(torch.ops.sapattn.svg2_attention.default, args)


def wan_output(model, inputs, cfg):
    with svg2_enabled(model, cfg), torch.no_grad():
        return model(**inputs)[0]


def test_diffusers_runs_every_method():
    model = tiny_models.wan_transformer(layers=2)
    inputs = tiny_models.wan_inputs(device=torch.device("cpu"), dtype=torch.float32)
    base = sapattn.SVG2Config(q_clusters=4, k_clusters=8, kmeans_iters_init=6, first_times_fp=0.0,
                              first_layers_fp=0.0, top_p=0.3, min_kc_ratio=0.0)
    outputs = {m: wan_output(model, inputs, base.with_method(m)) for m in ("sap", "ear", "ear-plus")}
    outputs["sap+c"] = wan_output(model, inputs, base.replace(compensate=True))
    outputs["sap d=0.5"] = wan_output(model, inputs, base.replace(density=0.5))
    outputs["sap fp8"] = wan_output(model, inputs, base.replace(attention_dtype="fp8_e4m3"))
    names = list(outputs)
    for i, a in enumerate(names):
        assert torch.isfinite(outputs[a]).all(), a
        for b in names[i + 1:]:
            assert not torch.equal(outputs[a], outputs[b]), (a, b)


def test_diffusers_refuses_fp8_off_the_cpu_at_enable():
    model = tiny_models.wan_transformer(layers=1).to("meta")
    with pytest.raises(NotImplementedError, match=r"attention_dtype='fp8_e4m3' runs on the CPU and on Hopper GPUs"):
        sd.enable(model, sapattn.SVG2Config(attention_dtype="fp8_e4m3"))
    assert not hasattr(model, "_sapattn")
    sd.enable(model, sapattn.SVG2Config().with_method("ear-plus"))  # the native dtype runs on CUDA: accepted
    sd.disable(model)


def parse(*options):
    return build_parser().parse_args(["--model", "m", "--prompt", "p", "--out", "v.mp4", *options])


def test_generate_options_set_the_method_fields():
    cfg = config_from_args(parse(), "wan", 480, 832)
    assert (cfg.routing, cfg.compensate, cfg.density) == ("top_p", False, 0.0)  # SVG2 as published
    cfg = config_from_args(parse("--method", "ear", "--density", "0.15"), "wan", 480, 832)
    assert (cfg.routing, cfg.compensate, cfg.ear_plus, cfg.density) == ("error_aware", True, False, 0.15)
    assert (cfg.q_clusters, cfg.top_p) == (200, 0.9)  # the preset is kept
    cfg = config_from_args(parse("--method", "ear-plus"), "hunyuan", 720, 1280)
    assert cfg.ear_spread and cfg.ear_split and cfg.ear_head_budget and cfg.q_clusters == 400
    cfg = config_from_args(parse("--compensate"), "wan", 720, 1280)
    assert (cfg.routing, cfg.compensate) == ("top_p", True)


@pytest.mark.parametrize("options, message", [
    (("--density", "0"), r"argument --density: 0 is not in \(0, 1\]"),
    (("--density", "1.5"), r"is not in \(0, 1\]"),
    (("--density", "x"), r"is not a number"),
    (("--method", "svg2"), r"invalid choice: 'svg2'"),
])
def test_generate_refuses_bad_method_options(capsys, options, message):
    with pytest.raises(SystemExit) as exit_:
        parse(*options)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
