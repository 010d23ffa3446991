"""Sequence-parallel SVG2: the head assignment never loses or duplicates work, and the parallel
result equals the single-process result on the same inputs (gloo processes on the CPU; NCCL on
several GPUs), with heads rebalanced and their k-means state moved between calls."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sapattn
from sapattn.parallel import SequenceParallelSVG2, balance, contiguous, replicas_for, shutdown
from conftest import clustered, randn

# -- the assignment ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads,world", [(40, 8), (12, 8), (24, 8), (12, 5), (3, 2), (7, 7), (5, 1)])
def test_every_head_shard_is_assigned_once(heads, world):
    replicas = replicas_for(heads, world)
    assert (heads * replicas) % world == 0
    g = torch.Generator().manual_seed(heads * 100 + world)
    for costs in ([1.0] * heads, (torch.rand(heads, generator=g) ** 3 + 0.01).tolist()):
        a = balance(costs, world, replicas)
        a.check()  # raises on a lost or duplicated (head, shard), or two shards of a head on one rank
        assert {len(items) for items in a.items} == {heads * replicas // world}
        assert balance(costs, world, replicas) == a  # deterministic: every rank computes the same


def test_balancing_evens_out_skewed_heads():
    costs = [0.9, 0.8, 0.2, 0.1, 0.15, 0.12, 0.7, 0.05]
    plain = contiguous(len(costs), 4)
    balanced = balance(costs, 4)
    assert plain.imbalance(costs) > 2.0
    # Two heads a rank: the best is the heaviest head with the lightest (0.9 + 0.05).
    assert max(balanced.loads(costs)) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        balance(costs, 2, replicas=3)


# -- the distributed call ------------------------------------------------------------------------

CONFIG = sapattn.SVG2Config(q_clusters=6, k_clusters=12, top_p=0.8, kmeans_iters_init=6, first_times_fp=0.0,
                            first_layers_fp=0.0)


def _inputs(heads, device, seed):
    """Heads of different structure, so that their densities differ: the first half diffuse noise
    (dense), the second half clustered (sparse). [B, S, H, D]."""
    batch, seq, dim = 2, 240, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for i in range(3):
        c = clustered(batch, seq, heads, dim, centers=5, seed=seed + i, device=device, dtype=dtype)
        noise = randn((batch, seq, heads, dim), seed=seed + 10 + i, device=device, dtype=dtype)
        c[:, :, :heads // 2] = noise[:, :, :heads // 2]
        out.append(c)
    return out


def _worker(rank, world, init_file, heads, backend, expect_rebalance, failures):
    try:
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
        sp = SequenceParallelSVG2(CONFIG, heads, threshold=1.0)
        reference = sapattn.BranchState()
        for call in range(3):  # initialise, warm start, warm start after a rebalance
            q, k, v = _inputs(heads, device, seed=10 * call)
            whole = sapattn.svg2_attention(q, k, v, CONFIG, reference)[0]
            seq = q.shape[1]
            lo, hi = rank * seq // world, (rank + 1) * seq // world
            mine = sp.attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], layer=0)
            if sp.replicas == 1 and device.type == "cpu":
                ok = torch.equal(mine, whole[:, lo:hi])  # the same per-head arithmetic
            else:
                ok = torch.allclose(mine.float(), whole[:, lo:hi].float(), rtol=1e-2 if device.type == "cuda" else 1e-5,
                                    atol=1e-2 if device.type == "cuda" else 1e-5)
            if not ok:
                diff = (mine.float() - whole[:, lo:hi].float()).abs().max().item()
                raise AssertionError(f"rank {rank} call {call}: parallel != single ({diff}), {sp.assignment.items}")
            if call == 1:
                before = sp.assignment
                if sp.rebalance() != expect_rebalance:
                    raise AssertionError(f"rebalance expected {expect_rebalance} from {before.items}")
                sp.assignment.check()
        del sp
        shutdown()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        failures.put(f"{type(e).__name__}: {e}")
        raise


def _spawn(target, world, *args):
    """Runs target(rank, world, init_file, *args, failures) in `world` processes and fails with
    every rank's error."""
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=target, args=(r, world, init_file, *args, failures)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, errors
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _run(world, heads, expect_rebalance, backend="gloo"):
    _spawn(_worker, world, heads, backend, expect_rebalance)


@pytest.mark.parametrize("world,heads,moves", [(2, 4, True), (4, 4, False), (3, 4, False), (4, 6, True)])
def test_parallel_equals_single_process_on_cpu(world, heads, moves):
    """(2, 4), (4, 4): Ulysses; (3, 4), (4, 6): heads that do not divide the ranks, split into
    key-cluster shards combined by LSE. The dense heads start on the same ranks where the ranks
    hold more than one head, so balancing moves heads (and their k-means state) before call 2;
    where every rank holds one head, or every head, nothing can improve."""
    _run(world, heads, moves)


if torch.cuda.device_count() >= 2:  # collected only on a machine with two GPUs or more

    def test_parallel_equals_single_gpu_over_nccl():
        _run(2, 4, True, backend="nccl")
        _run(2, 3, False, backend="nccl")


# -- inside diffusers' context parallelism ---------------------------------------------------------


def _context_parallel_worker(rank, world, init_file, heads, dense_layers, failures):
    """A small Wan model run with diffusers' context parallelism (Ulysses over `world` ranks) and
    sapattn enabled against the same model on one process. model.enable_parallelism() derives an
    accelerator device, which a CPU-only machine has none of; this sets the model up as it does
    (ParallelConfig.setup with a CPU mesh, the processors' _parallel_config, apply_context_parallel
    with the model's _cp_plan), which is all it does besides."""
    try:
        import tiny_models
        from diffusers import ContextParallelConfig
        from diffusers.hooks.context_parallel import apply_context_parallel
        from diffusers.models._modeling_parallel import ParallelConfig
        from torch.distributed.device_mesh import init_device_mesh

        import sapattn.diffusers as sd

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        cfg = CONFIG.replace(q_clusters=4, k_clusters=8, first_layers_fp=dense_layers / 2)
        model = tiny_models.wan_transformer(layers=2, heads=heads)
        inputs = tiny_models.wan_inputs(seed=3)
        sd.enable(model, cfg)
        with torch.no_grad():
            single = model(**inputs)[0]
        sd.disable(model)

        cp = ContextParallelConfig(ulysses_degree=world)
        parallel = ParallelConfig(context_parallel_config=cp)
        parallel.setup(rank, world, torch.device("cpu"), mesh=init_device_mesh("cpu", cp.mesh_shape,
                                                                                mesh_dim_names=cp.mesh_dim_names))
        model._parallel_config = parallel
        controller = sd.enable(model, cfg)  # sapattn first, then the parallel config reaches its processors
        for module in model.modules():
            if hasattr(getattr(module, "processor", None), "_parallel_config"):
                module.processor._parallel_config = parallel
        apply_context_parallel(model, cp, model._cp_plan)
        with torch.no_grad():
            out = model(**inputs)[0]
        if not torch.allclose(out, single, rtol=1e-5, atol=1e-5):
            raise AssertionError(f"rank {rank}: context parallel != single process "
                                 f"({(out - single).abs().max().item()})")
        if len(controller._parallel) != 1:
            raise AssertionError("the sparse layers did not go through sapattn's sequence parallelism")
        # The clean-shutdown order (docs/parallel.md): release what holds process groups (sapattn's
        # state, the model's context-parallel hooks, the device mesh), then leave.
        sd.disable(model)
        del model, controller, parallel, cp
        shutdown()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        failures.put(f"{type(e).__name__}: {e}")
        raise


@pytest.mark.parametrize("world,heads,dense_layers", [(2, 4, 1), (3, 4, 0)])
def test_diffusers_context_parallel_equals_single_process(world, heads, dense_layers):
    """(2, 4, 1): layer 0 dense through diffusers' own Ulysses, layer 1 SVG2 through sapattn's;
    (3, 4, 0): 4 heads on 3 ranks, SVG2 in key-cluster shares."""
    _spawn(_context_parallel_worker, world, heads, dense_layers)
