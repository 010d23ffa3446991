"""GPU-only behaviour: CUDA graph capture of a sparse layer call, the kernel the GPU runs, and
the current-stream contract. Collected only where torch sees a GPU (conftest.py)."""

from __future__ import annotations

import torch

import sapattn
from test_ops import qkv, small_config


def test_cuda_graph_capture_of_a_sparse_call():
    device = torch.device("cuda")
    q, k, v = qkv(device, seq=2048, heads=4, dim=128)
    cfg = small_config(q_clusters=16, k_clusters=64, top_p=0.8)
    state = sapattn.BranchState()
    sapattn.svg2_attention(q, k, v, cfg, state)  # the first call initialises (50-iteration path)
    snapshot = (state.q_centroids.clone(), state.k_centroids.clone())
    eager = sapattn.svg2_attention(q, k, v, cfg, state)[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records only: the state is untouched until replay
        captured = sapattn.svg2_attention(q, k, v, cfg, state)[0]
    state.q_centroids.copy_(snapshot[0])
    state.k_centroids.copy_(snapshot[1])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_the_hopper_kernel_runs_on_hopper():
    q = torch.zeros(1, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
    major, _ = torch.cuda.get_device_capability()
    expected = "sm90a-wgmma" if major == 9 else "sm80-mma"
    assert sapattn.attention_kernel(q) == expected
    assert sapattn.attention_kernel(q.float()).startswith("unsupported")


def test_runs_on_the_current_stream():
    device = torch.device("cuda")
    q, k, v = qkv(device, seq=1024, heads=2, dim=128)
    cfg = small_config(q_clusters=16, k_clusters=32, top_p=0.8)
    reference = sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState())[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = sapattn.svg2_attention(q, k, v, cfg, sapattn.BranchState())[0]
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, reference)


def test_cuda_graph_capture_of_a_sparse_wan_layer():
    """A Wan self-attention layer in its warm sparse phase (sapattn's processor: projections,
    RoPE, SVG2 with 2 k-means iterations) captured in a CUDA graph replays what it computes eagerly."""
    import sapattn.diffusers as sd
    import tiny_models

    device = torch.device("cuda")
    model = tiny_models.wan_transformer(layers=2).to(device, torch.bfloat16)
    inputs = tiny_models.wan_inputs(device=device, dtype=torch.bfloat16)
    controller = sd.enable(model, sapattn.SVG2Config(q_clusters=4, k_clusters=8, top_p=0.7, first_times_fp=0.0,
                                                     first_layers_fp=0.0))
    try:
        captured_args = {}

        def keep_args(module, args):
            captured_args["args"] = tuple(a.clone() if torch.is_tensor(a) else a for a in args[:3]) + (
                tuple(t.clone() for t in args[3]),)

        hook = model.blocks[1].attn1.register_forward_pre_hook(keep_args)
        with torch.no_grad():
            model(**inputs)  # the initialising call of every layer, and the layer's inputs
        hook.remove()
        state = controller.layers[1].branch(0)
        snapshot = (state.q_centroids.clone(), state.k_centroids.clone())
        attn = model.blocks[1].attn1
        with torch.no_grad():
            eager = attn(*captured_args["args"])
            state.q_centroids.copy_(snapshot[0])
            state.k_centroids.copy_(snapshot[1])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = attn(*captured_args["args"])
            state.q_centroids.copy_(snapshot[0])
            state.k_centroids.copy_(snapshot[1])
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, eager)
    finally:
        sd.disable(model)
