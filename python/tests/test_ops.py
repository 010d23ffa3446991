"""The torch ops and the module API: against torch's own attention, the engine's contracts (text
rule, warm starts, per-item prompts), bad input, torch.compile's fake kernels, graph capture."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import pytest
import torch

import sapattn
from conftest import clustered, randn, sdpa, working_dtype


def small_config(**changes):
    return sapattn.SVG2Config(q_clusters=8, k_clusters=16, kmeans_iters_init=8, first_times_fp=0.0,
                              first_layers_fp=0.0).replace(**changes)


def tolerance(q, k, v, mask=None):
    """FA3's error model: at most twice the error of torch's attention in the same dtype against
    float32 (plus float32 rounding for float32 inputs)."""
    if q.dtype == torch.float32:
        return 2e-5
    low = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask).transpose(1, 2)
    return 2.0 * (low.float() - sdpa(q, k, v, mask)).abs().max().item() + 1e-6


def qkv(device, batch=2, seq=320, heads=3, dim=64, seed=0):
    dtype = working_dtype(device)
    return [clustered(batch, seq, heads, dim, centers=6, seed=seed + i, device=device, dtype=dtype) for i in range(3)]


def test_top_p_one_equals_dense(device):
    q, k, v = qkv(device)
    state = sapattn.BranchState()
    out, lse, density = sapattn.svg2_attention(q, k, v, small_config(top_p=1.0), state, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.float() - sdpa(q, k, v)).abs().max().item() <= tolerance(q, k, v)
    ref_lse = torch.logsumexp(torch.einsum("bshd,bthd->bhst", q.float(), k.float()) / math.sqrt(q.shape[-1]), dim=-1)
    assert (lse - ref_lse).abs().max().item() < 1e-3
    assert torch.all(density == 1.0)
    assert state.calls == 1 and state.q_centroids.shape == (2, 3, 8, 64)


def test_sparse_attends_to_a_subset_of_the_keys(device):
    q, k, v = qkv(device)
    state = sapattn.BranchState()
    out, lse, density = sapattn.svg2_attention(q, k, v, small_config(top_p=0.5, min_kc_ratio=0.0), state,
                                               return_lse=True)
    _, dense_lse = sapattn.dense_attention(q, k, v, return_lse=True)
    # Fewer keys: every row's log-sum-exp is at most the dense one (up to rounding).
    assert torch.all(lse <= dense_lse + 1e-3)
    assert torch.all((density > 0.0) & (density < 1.0))
    assert torch.isfinite(out.float()).all()


def test_dense_attention_equals_torch(device):
    q, k, v = qkv(device, seq=200)
    out, lse = sapattn.dense_attention(q, k, v)
    assert lse is None
    assert (out.float() - sdpa(q, k, v)).abs().max().item() <= tolerance(q, k, v)


def test_strided_inputs_equal_contiguous(device):
    q, k, v = qkv(device)
    # [B, H, S, D] memory seen as [B, S, H, D]: strided views go in without a copy.
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    a = sapattn.svg2_attention(q, k, v, small_config(top_p=0.7), sapattn.BranchState())[0]
    b = sapattn.svg2_attention(qs, ks, vs, small_config(top_p=0.7), sapattn.BranchState())[0]
    assert torch.equal(a, b)


def test_warm_start_uses_the_state(device):
    q, k, v = qkv(device)
    cfg = small_config(top_p=0.7)
    state = sapattn.BranchState()
    sapattn.svg2_attention(q, k, v, cfg, state)
    first = state.q_centroids.clone()
    q2 = q + 0.05 * randn(q.shape, seed=9, device=device, dtype=q.dtype)
    sapattn.svg2_attention(q2, k, v, cfg, state)
    assert state.calls == 2
    moved = (state.q_centroids - first).abs().max().item()
    assert 0.0 < moved < 1.0  # refined from the cached centroids, not re-sampled
    # The same two calls on a fresh state give the same centroids: deterministic.
    again = sapattn.BranchState()
    sapattn.svg2_attention(q, k, v, cfg, again)
    sapattn.svg2_attention(q2, k, v, cfg, again)
    assert torch.equal(again.q_centroids, state.q_centroids)


def test_warm_centroids_match_the_first_sparse_call(device):
    q, k, v = qkv(device)
    cfg = small_config(top_p=0.7, kmeans_iters_init=8)
    warmed = sapattn.BranchState()
    sapattn.warm_centroids(q, k, cfg, warmed, 8)
    assert warmed.warm_iters == 8 and warmed.calls == 0
    # The same seeded sample and the same 8 iterations as an initialising svg2 call.
    cold = sapattn.BranchState()
    sapattn.svg2_attention(q, k, v, cfg, cold)
    assert torch.equal(warmed.q_centroids, cold.q_centroids)
    assert torch.equal(warmed.k_centroids, cold.k_centroids)
    # A warmed state is not initialised again: its first sparse call is the cold state's second.
    out_warm = sapattn.svg2_attention(q, k, v, cfg, warmed)[0]
    out_cold = sapattn.svg2_attention(q, k, v, cfg, cold)[0]
    assert warmed.calls == 1 and cold.calls == 2
    assert torch.equal(warmed.q_centroids, cold.q_centroids)
    assert torch.equal(out_warm, out_cold)


def test_first_call_seeds_as_the_config_says(device):
    """kmeans_seeding and kmeans_sample_factor reach the engine: with no iterations after the seeding,
    the first call's centroids are the kmeans op's seeding of the same tokens."""
    q, k, v = qkv(device, batch=1)
    seeded = {}
    for seeding in ("greedy_pp", "sample"):
        cfg = small_config(kmeans_seeding=seeding, kmeans_sample_factor=3, kmeans_iters_init=0, seed=5)
        state = sapattn.BranchState()
        sapattn.svg2_attention(q, k, v, cfg, state)
        for points, centroids, keys in ((q, state.q_centroids, False), (k, state.k_centroids, True)):
            alone = torch.empty_like(centroids)
            torch.ops.sapattn.kmeans(points, alone, True, 0, 5, keys=keys, seeding=seeding, sample_factor=3)
            assert torch.equal(alone, centroids), (seeding, keys)
        seeded[seeding] = state.k_centroids
    assert not torch.equal(seeded["greedy_pp"], seeded["sample"])
    with pytest.raises(ValueError, match="kmeans_sample_factor must be in \\[1, 64\\], got 0"):
        small_config(kmeans_sample_factor=0)
    with pytest.raises(ValueError, match="kmeans_seeding must be 'greedy_pp' or 'sample', got 'kmeans'"):
        small_config(kmeans_seeding="kmeans")
    with pytest.raises(ValueError, match="sample_factor must be >= 1"):
        torch.ops.sapattn.kmeans(q, torch.empty(1, 3, 8, 64, device=device), True, 0, 0, sample_factor=0)


def test_kmeans_candidates_reach_the_engine(device):
    """kmeans_candidates reaches the engine: covering every cluster it changes nothing; with one, the
    labels stay those of the first two iterations and the clusters of unstructured tokens (which
    Lloyd keeps moving) come out otherwise; a negative count is refused with the engine's message."""
    dtype = working_dtype(device)
    q, k, v = (randn((1, 320, 3, 64), seed=40 + i, device=device, dtype=dtype) for i in range(3))
    runs = {}
    for m in (0, 16, 1):
        state = sapattn.BranchState()
        out = sapattn.svg2_attention(q, k, v, small_config(kmeans_candidates=m), state)[0]
        runs[m] = (out, state.q_centroids.clone(), state.k_centroids.clone())
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[16]))
    assert not torch.equal(runs[0][1], runs[1][1]) and not torch.equal(runs[0][2], runs[1][2])
    with pytest.raises(ValueError, match="kmeans_candidates must be >= 0, got -1"):
        small_config(kmeans_candidates=-1)


def test_rope_pairs_op_is_the_eager_expression(device):
    """The diffusers adapters' RoPE through sapattn's one-pass op gives the eager expression's values
    bit for bit, on [B, S, H, D] views of a projection (as the processors pass them) and on
    contiguous tensors; cos and sin of another shape fall back to the eager expression."""
    from sapattn.diffusers.core import rope_pairs, rope_pairs_eager

    seq, heads, dim = 50, 3, 16
    angles = randn((seq, dim // 2), seed=7, device=device) * 3.0
    cos = torch.cos(angles).repeat_interleave(2, dim=-1)[None, :, None, :]
    sin = torch.sin(angles).repeat_interleave(2, dim=-1)[None, :, None, :]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        projected = randn((2, seq, heads * dim), seed=8, device=device, dtype=dtype)
        x = projected.unflatten(2, (heads, -1))  # a strided view, as split_heads makes it
        want = rope_pairs_eager(x, cos, sin)
        got = rope_pairs(x, cos, sin)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, want), dtype
        assert torch.equal(torch.ops.sapattn.rope_pairs(x.contiguous(), cos[0, :, 0], sin[0, :, 0]), want)
        assert torch.equal(rope_pairs(x, cos[0, :, 0], sin[0, :, 0]), want)  # [S, D] cos and sin
    odd_cos = cos[:, :, :, :dim].expand(2, seq, 1, dim)  # per batch item: not the op's shape
    x = randn((2, seq, heads, dim), seed=9, device=device)
    assert torch.equal(rope_pairs(x, odd_cos, sin.expand(2, seq, 1, dim)), rope_pairs_eager(x, odd_cos, sin))
    with pytest.raises(ValueError, match="head dim must be even"):
        torch.ops.sapattn.rope_pairs(torch.zeros(1, 4, 2, 3, device=device), torch.zeros(4, 3, device=device),
                                     torch.zeros(4, 3, device=device))


def test_attention_dtype_reaches_the_engine(device):
    """attention_dtype round-trips through SVG2Config and the op. "fp8_e4m3" keeps the clusters and the
    selection and computes the attention in e4m3: close to the native output (the FP8 goal's
    worst-head bound, 0.05), not equal to it. On CUDA it runs on the Hopper e4m3 kernel (head dim 128);
    elsewhere, or at head dim 64, the engine refuses it before it touches the state."""
    cfg = small_config(top_p=0.7)
    assert cfg.attention_dtype == "native"
    fp8 = cfg.replace(attention_dtype="fp8_e4m3")
    assert fp8.attention_dtype == "fp8_e4m3" and dataclasses.replace(fp8) == fp8
    with pytest.raises(ValueError, match="attention_dtype must be 'native' or 'fp8_e4m3', got 'fp8'"):
        small_config(attention_dtype="fp8")
    q, k, v = qkv(device)
    if device.type != "cpu":
        state = sapattn.BranchState()
        with pytest.raises(NotImplementedError, match="attention_dtype E4M3 .*needs the Hopper kernel"):
            sapattn.svg2_attention(q, k, v, fp8, state)  # head dim 64
        assert not state.initialized
        q, k, v = qkv(device, dim=128)
        if torch.cuda.get_device_capability(device) != (9, 0):
            with pytest.raises(NotImplementedError, match="attention_dtype E4M3 .*needs the Hopper kernel"):
                sapattn.svg2_attention(q, k, v, fp8, state)
            return
    native, _, native_density = sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState())
    e4m3, _, density = sapattn.svg2_attention(q, k, v, fp8, sapattn.BranchState())
    assert torch.equal(density, native_density), "the same selection"
    assert not torch.equal(e4m3, native)
    assert ((e4m3.float() - native.float()).norm() / native.float().norm()).item() < 0.05


def test_text_tokens_follow_the_joint_rule(device):
    batch, video, text, heads, dim = 2, 256, 16, 2, 64
    dtype = working_dtype(device)
    q, k, v = (clustered(batch, video + text, heads, dim, centers=5, seed=20 + i, device=device, dtype=dtype)
               for i in range(3))
    prompt = 10
    out, _, _ = sapattn.svg2_attention(q, k, v, small_config(top_p=1.0), sapattn.BranchState(), text_tokens=text,
                                       prompt_length=prompt)
    # top_p = 1: video and prompt queries see every video key and the prompt, never the padding.
    keys = torch.zeros(1, 1, 1, video + text, dtype=torch.bool, device=device)  # broadcast over [B, H, Sq]
    keys[..., :video + prompt] = True
    ref = sdpa(q, k, v, mask=keys)
    rows = slice(0, video + prompt)
    assert (out[:, rows].float() - ref[:, rows]).abs().max().item() <= tolerance(q, k, v, keys)
    # Padding queries attend only to padding keys.
    pad = torch.zeros_like(keys)
    pad[..., video + prompt:] = True
    ref_pad = sdpa(q, k, v, mask=pad)
    assert (out[:, video + prompt:].float() - ref_pad[:, video + prompt:]).abs().max().item() <= tolerance(q, k, v, pad)


def test_prompt_length_per_batch_item(device):
    batch, video, text, heads, dim = 2, 200, 12, 2, 64
    dtype = working_dtype(device)
    q, k, v = (clustered(batch, video + text, heads, dim, centers=5, seed=30 + i, device=device, dtype=dtype)
               for i in range(3))
    cfg = small_config(top_p=0.8)
    both = sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState(), text_tokens=text, prompt_length=[5, 12])[0]
    for b, n in enumerate([5, 12]):
        # Item b alone, sampling its k-means start as it does in the batch (stream b*H + h).
        ids = (b * heads + torch.arange(heads, device=device, dtype=torch.int32))[None]
        one = sapattn.svg2_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], cfg, sapattn.BranchState(), text_tokens=text,
                                     prompt_length=n, sample_ids=ids)[0]
        assert torch.equal(both[b:b + 1], one)
    # Equal lengths given per item take the batched call: the same result as one length.
    same = sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState(), text_tokens=text, prompt_length=[12, 12])[0]
    assert torch.equal(same, sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState(), text_tokens=text,
                                                    prompt_length=12)[0])
    assert torch.equal(same[1:], both[1:])


def test_bad_input_raises_clear_errors(device):
    q, k, v = qkv(device, seq=64)
    cfg = small_config()
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        sapattn.svg2_attention(q[0], k[0], v[0], cfg, sapattn.BranchState())
    with pytest.raises(ValueError, match="ShapeError"):
        sapattn.svg2_attention(q, k[:, :32], v, cfg, sapattn.BranchState())
    with pytest.raises(TypeError, match="f32, f16 or bf16"):
        sapattn.dense_attention(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(TypeError, match="k has dtype"):
        sapattn.dense_attention(q, k.to(torch.float16 if q.dtype != torch.float16 else torch.bfloat16), v)
    with pytest.raises(ValueError, match="top_p"):
        small_config(top_p=0.0)
    fresh = sapattn.BranchState()
    with pytest.raises(ValueError, match="InvalidArgumentError"):
        sapattn.svg2_attention(q, k, v, cfg, fresh, text_tokens=64)
    assert not fresh.initialized  # a failed first call leaves no uninitialised centroids behind
    with pytest.raises(ValueError, match="prompt lengths"):
        sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState(), text_tokens=8, prompt_length=[1, 2, 3])
    state = sapattn.BranchState()
    sapattn.svg2_attention(q, k, v, cfg, state)
    with pytest.raises(ValueError, match="reset"):
        sapattn.svg2_attention(q, k, v, cfg.replace(q_clusters=4), state)
    bad = q.clone()
    bad[0, 3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NonFiniteError"):
        sapattn.svg2_attention(bad, k, v, cfg.replace(check_finite=True), sapattn.BranchState())


def test_meta_tensors_and_opcheck():
    """The fake kernels give the real kernels' shapes, and the schema declares the mutations."""
    q, k, v = qkv(torch.device("cpu"), seq=96, batch=1)
    qc = torch.zeros(1, 3, 8, 64)
    kc = torch.zeros(1, 3, 16, 64)
    args = (q, k, v, qc, kc, True, 0.9, 0.1, 4, 2, 0, 0, 0, 0.0, False, True)
    torch.library.opcheck(torch.ops.sapattn.svg2_attention.default, args)
    torch.library.opcheck(torch.ops.sapattn.dense_attention.default, (q, k, v, 0.0, True))
    cos, sin = torch.rand(96, 64), torch.rand(96, 64)
    torch.library.opcheck(torch.ops.sapattn.rope_pairs.default, (q, cos, sin))
    meta = [t.to("meta") for t in (q, k, v, qc, kc)]
    out, lse, density = torch.ops.sapattn.svg2_attention(*meta, *args[5:])
    assert out.shape == q.shape and lse.shape == (1, 3, 96) and density.shape == (1, 3)


def test_the_op_takes_svg2config_as_its_schema_says():
    """The op's arguments are the call's own and SVG2Config's fields, its schema generated
    from one C++ table whose defaults are the C++ Config's; Python derives the keyword arguments
    from the schema, and a disagreement on names or defaults stops the import."""
    from sapattn import attention, config

    schema = torch.ops.sapattn.svg2_attention.default._schema
    arguments = {a.name: a for a in schema.arguments}
    fields = {f.name: f for f in dataclasses.fields(sapattn.SVG2Config)}
    assert set(attention._CONFIG_ARGUMENTS) == set(fields) - set(config.HOST_FIELDS)
    assert set(arguments) == set(attention._CALL_ARGUMENTS) | set(attention._CONFIG_ARGUMENTS)
    for name in attention._CONFIG_ARGUMENTS:
        if name not in config.DEFAULTS_UNLIKE_CPP:
            assert arguments[name].default_value == fields[name].default, name
    # The one difference, on purpose: the C++ Config checks Q, K, V for NaN/Inf, Python does not.
    assert config.DEFAULTS_UNLIKE_CPP == ("check_finite",)
    assert arguments["check_finite"].default_value is True and fields["check_finite"].default is False
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == [
        "q_centroids", "k_centroids"]

    Argument = collections.namedtuple("Argument", "name default_value")
    wrong = [Argument(a.name, 0.8 if a.name == "top_p" else a.default_value) for a in schema.arguments
             if a.name != "ear_split"] + [Argument("ear_splt", False)]
    with pytest.raises(ImportError) as error:
        attention._config_arguments(wrong)
    for problem in ("the op takes ear_splt, which SVG2Config has no field for",
                    "SVG2Config.ear_split is no argument of the op",
                    "SVG2Config.top_p defaults to 0.9, the C++ Config to 0.8", "Rebuild the library"):
        assert problem in str(error.value)


def test_the_schema_defaults_are_svg2configs():
    """The op called with its inputs alone runs with the schema's defaults: SVG2Config()'s."""
    q, k, v = qkv(torch.device("cpu"), batch=1, seq=256, heads=2)
    cfg = sapattn.SVG2Config(q_clusters=8, k_clusters=16)
    state = sapattn.BranchState()
    out, lse, density = sapattn.svg2_attention(q, k, v, cfg, state, return_lse=True)
    fresh = sapattn.BranchState()
    fresh.prepare(q, cfg)
    alone = torch.ops.sapattn.svg2_attention(q, k, v, fresh.q_centroids, fresh.k_centroids, True, return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip((out, lse, density), alone))
    assert torch.equal(state.k_centroids, fresh.k_centroids)
    # Keyword options reach the fake kernel too (the dispatcher drops trailing defaults).
    meta = [t.to("meta") for t in (q, k, v, fresh.q_centroids, fresh.k_centroids)]
    assert torch.ops.sapattn.svg2_attention(*meta, True)[1].shape == (0,)
    assert torch.ops.sapattn.svg2_attention(*meta, True, return_lse=True)[1].shape == (1, 2, 256)
    torch.library.opcheck(torch.ops.sapattn.svg2_attention.default, (q, k, v, fresh.q_centroids, fresh.k_centroids,
                                                                     True), {"return_lse": True, "top_p": 0.5})


def test_errors_speak_the_callers_layout():
    """Errors give shapes and dim numbers as the caller passed them ([B, S, H, D]), one prefix."""
    q, k = randn((1, 256, 2, 64), seed=1, device="cpu"), randn((1, 100, 2, 64), seed=2, device="cpu")
    with pytest.raises(ValueError) as error:
        sapattn.svg2_attention(q, k, k, small_config(), sapattn.BranchState())
    want = "sapattn ShapeError: k dim 1 (S of [B,S,H,D]) must be 256 as in q, got [1,100,2,64] f32 cpu"
    assert want in str(error.value)
    assert str(error.value).count("sapattn") == 1
    short_d = randn((1, 256, 2, 32), seed=3, device="cpu")
    with pytest.raises(ValueError, match=re.escape("k dim 3 (D of [B,S,H,D]) must be 64 as in q, got [1,256,2,32]")):
        sapattn.dense_attention(q, short_d, short_d)
    empty = torch.empty(1, 0, 2, 64)
    message = "q is empty ([1,0,2,64] f32 cpu as [B,S,H,D]): attention needs B, S, H and D >= 1"
    state = sapattn.BranchState()
    with pytest.raises(ValueError, match=re.escape(message)):
        sapattn.svg2_attention(empty, empty, empty, small_config(), state)
    assert not state.initialized
    with pytest.raises(ValueError, match=re.escape(message)):
        sapattn.dense_attention(empty, empty, empty)


def test_warm_centroids_refuses_what_svg2_attention_refuses():
    """warm_centroids checks q, k and text_tokens as svg2_attention does, in the caller's [B,S,H,D]
    terms and before it touches the state; the k-means op it calls would speak of points and
    centroids, and took a text longer than the sequence as a shorter slice without a word."""
    q = randn((1, 10, 2, 64), seed=1, device="cpu")
    cases = [({"k": randn((1, 12, 2, 64), seed=2, device="cpu")},
              "k must have q's shape [1,10,2,64] ([B,S,H,D]), got [1,12,2,64]"),
             ({"k": randn((1, 10, 3, 64), seed=3, device="cpu")},
              "k must have q's shape [1,10,2,64] ([B,S,H,D]), got [1,10,3,64]"),
             ({"text_tokens": 16}, "text_tokens (16) must leave at least one video token in a sequence of 10"),
             ({"text_tokens": 10}, "text_tokens (10) must leave at least one video token in a sequence of 10"),
             ({"text_tokens": -3}, "text_tokens must be >= 0, got -3"),
             ({"q": torch.empty(1, 0, 2, 64), "k": torch.empty(1, 0, 2, 64)},
              "q is empty ([1,0,2,64] as [B,S,H,D]): warm_centroids needs B, S, H and D >= 1")]
    for changes, message in cases:
        call = {"q": q, "k": q, "text_tokens": 0, **changes}
        state = sapattn.BranchState()
        with pytest.raises(ValueError, match=re.escape("sapattn: " + message)):
            sapattn.warm_centroids(call["q"], call["k"], sapattn.SVG2Config(), state, 2,
                                   text_tokens=call["text_tokens"])
        assert not state.initialized
    state = sapattn.BranchState()
    sapattn.warm_centroids(q, q, sapattn.SVG2Config(), state, 2, text_tokens=4)
    assert state.warm_iters == 2 and state.q_centroids.shape == (1, 2, 1, 64)
    # An empty q with cluster counts of its own is reported as empty, not as too few tokens.
    no_heads = torch.empty(1, 400, 0, 64)
    message = "sapattn ShapeError: q is empty ([1,400,0,64] f32 cpu as [B,S,H,D])"
    with pytest.raises(ValueError, match=re.escape(message)):
        sapattn.svg2_attention(no_heads, no_heads, no_heads, sapattn.SVG2Config.wan_480p(), sapattn.BranchState())


def test_default_cluster_counts_scale_with_the_sequence():
    """SVG2Config() counts follow the sapattn command's rule: 300 / 1000 clusters at Wan 720p's
    75,600 tokens, the same tokens per cluster (252 / 75.6) below."""
    cfg = sapattn.SVG2Config()
    assert cfg.cluster_counts(75_600) == (300, 1000)
    assert cfg.cluster_counts(200_000) == (300, 1000)
    assert cfg.cluster_counts(32_760) == (130, 434)
    assert cfg.cluster_counts(256) == (2, 4)
    assert cfg.cluster_counts(1) == (1, 1)
    assert sapattn.SVG2Config(q_clusters=7).cluster_counts(256) == (7, 4)
    # A 256-token video with 16 text tokens: the state gets 2 query and 4 key clusters.
    q, k, v = qkv(torch.device("cpu"), batch=1, seq=272, heads=2)
    state = sapattn.BranchState()
    sapattn.svg2_attention(q, k, v, cfg, state, text_tokens=16, prompt_length=16)
    assert state.q_centroids.shape == (1, 2, 2, 64) and state.k_centroids.shape == (1, 2, 4, 64)


def test_cluster_counts_above_the_tokens_are_errors():
    q, k, v = qkv(torch.device("cpu"), batch=1, seq=272, heads=2)
    message = ("SVG2Config: k_clusters=1000 exceeds the 256 video tokens of this call: a cluster needs at least one "
               "token; leave k_clusters=None for one cluster per 75.6 video tokens (at most 1000)")
    for run in (lambda s: sapattn.svg2_attention(q, k, v, sapattn.SVG2Config.wan_480p(), s, text_tokens=16),
                lambda s: sapattn.warm_centroids(q, k, sapattn.SVG2Config.wan_480p(), s, 2, text_tokens=16)):
        state = sapattn.BranchState()
        with pytest.raises(ValueError, match=re.escape(message)):
            run(state)
        assert not state.initialized
    # The op itself refuses too (the engine's check), in the engine's names.
    centroids = [torch.zeros(1, 2, n, 64) for n in (300, 8)]
    with pytest.raises(ValueError, match=re.escape("sapattn InvalidArgumentError: q_clusters (300) exceeds the 272 "
                                                   "video tokens")):
        torch.ops.sapattn.svg2_attention(q, k, v, *centroids, True, 0.9, 0.1, 2, 2, 0, 0, 0, 0.0, False, False)


def test_nan_rows_come_back_as_nan_like_sdpa():
    """check_finite off (the default): a NaN query's own row is NaN, and nothing else (as in torch's
    attention); a NaN key makes every row of its head NaN. The CPU path; docs/torch.md says what the
    CUDA kernels do."""
    q, k, v = qkv(torch.device("cpu"), batch=1, seq=320, heads=2)
    cfg = small_config(top_p=0.5)
    q[0, 37, 1, 5] = float("nan")
    out, lse, _ = sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState(), return_lse=True)
    nan_rows = torch.isnan(out).any(-1)  # [B, S, H]
    assert torch.equal(nan_rows, torch.isnan(sdpa(q, k, v)).any(-1)) and nan_rows.sum() == 1
    assert torch.isnan(out[0, 37, 1]).all() and torch.isnan(lse[0, 1, 37])
    assert torch.isfinite(lse).sum() == lse.numel() - 1
    dense_out, dense_lse = sapattn.dense_attention(q, k, v, return_lse=True)
    assert torch.equal(torch.isnan(dense_out), torch.isnan(out))
    assert torch.equal(torch.isnan(dense_lse), torch.isnan(lse))
    q, k, v = qkv(torch.device("cpu"), batch=1, seq=320, heads=2)
    k[0, 3, 0, 1] = float("nan")
    out, lse, _ = sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState(), return_lse=True)
    assert torch.equal(torch.isnan(out), torch.isnan(sdpa(q, k, v)))
    assert torch.isnan(lse[0, 0]).all() and torch.isfinite(lse[0, 1]).all()


def test_ops_are_inference_only():
    """No backward: asking for a gradient raises instead of leaving q.grad None."""
    q, k, v = (t.requires_grad_() for t in qkv(torch.device("cpu"), batch=1, seq=64, heads=2))
    out, lse, density = sapattn.svg2_attention(q, k, v, small_config(), sapattn.BranchState(), return_lse=True)
    assert out.requires_grad and lse.requires_grad
    with pytest.raises(RuntimeError, match="sapattn.svg2_attention is inference-only and has no backward"):
        (out.sum() + q.sum()).backward()
    dense, _ = sapattn.dense_attention(q, k, v)
    with pytest.raises(RuntimeError, match="sapattn.dense_attention is inference-only and has no backward"):
        dense.sum().backward()
    with torch.no_grad():
        out = sapattn.svg2_attention(q, k, v, small_config(), sapattn.BranchState())[0]
    assert not out.requires_grad
    frozen = sapattn.dense_attention(q.detach(), k.detach(), v.detach())[0]
    assert not frozen.requires_grad
