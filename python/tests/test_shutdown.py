"""Clean shutdown as a contract (docs/parallel.md): a process that used the CPU backend, the torch
ops and the sequence-parallel path, in any order, exits with status 0 after
sapattn.parallel.shutdown(). Run many times, because the failure this guards against (a gloo worker
thread freeing a Python-owned tensor during interpreter finalisation: SIGABRT after every check had
passed) is a race that shows in a few runs out of ten."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

import sapattn
from conftest import clustered
from test_parallel import CONFIG, _spawn
from sapattn.parallel import SequenceParallelSVG2, shutdown

RUNS = 30
ORDERS = list(itertools.permutations(("cpu", "ops", "parallel")))


def _scenario(rank, world, init_file, order, failures):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        q, k, v = (clustered(1, 96, 4, 32, centers=4, seed=s, device=torch.device("cpu")) for s in range(3))
        sp = SequenceParallelSVG2(CONFIG, heads=4)
        for step in order:
            if step == "cpu":  # the C++ CPU backend through the whole SVG2 call (threads of its own)
                out = sapattn.svg2_attention(q, k, v, CONFIG, sapattn.BranchState())[0]
            elif step == "ops":  # the single torch ops
                out = sapattn.dense_attention(q, k, v)[0]
            else:  # collectives on gloo's worker threads
                lo, hi = rank * 96 // world, (rank + 1) * 96 // world
                out = sp.attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], layer=0)
            if not torch.isfinite(out).all():
                raise AssertionError(f"rank {rank}: {step} gave a non-finite output")
        del sp
        shutdown()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        failures.put(f"{type(e).__name__}: {e}")
        raise


def test_every_run_exits_with_status_zero():
    # _spawn asserts that no rank reported an error and that every exit code is 0.
    for run in range(RUNS):
        _spawn(_scenario, 2, ORDERS[run % len(ORDERS)])


def test_shutdown_without_distributed_is_a_no_op():
    assert not dist.is_initialized()
    shutdown()
