"""Leaving torch.distributed so that the process exits with status 0.

A gloo process group runs its collectives on worker threads, and a worker can hold the last
reference to a tensor that Python created (the input or output of the last collective). If the
group is still alive when the interpreter finalises, such a worker needs the GIL to free that tensor
while the interpreter is being torn down; CPython then ends the thread with pthread_exit, whose
unwinding crosses a noexcept frame of the C++ worker, and the process dies with
`terminate called without an active exception` (SIGABRT) although every check passed. Gloo's
shutdown() is a no-op in torch 2.11: only the group's destructor joins its workers, and it runs
only once the last Python reference is gone (a DeviceMesh, a model's context-parallel hooks,
a SequenceParallelSVG2 and reference cycles among them all hold the group).

The agreed order, on every rank: release the objects that hold groups, then shutdown()."""

from __future__ import annotations

import gc

import torch.distributed as dist


def shutdown() -> None:
    """Leaves torch.distributed on this rank; every rank of the default group calls it.

    1. A barrier on the default group: no rank destroys its groups while another is still inside a
       collective with it.
    2. destroy_process_group() for every group.
    3. A garbage collection, so that groups kept alive only by reference cycles are destroyed (their
       worker threads joined) now, while the interpreter is whole, not during its finalisation.

    Call it after releasing the objects that hold process groups: sapattn.diffusers.disable(model)
    drops sapattn's; drop the model itself (or its parallel config and device mesh) if it was set
    up for context parallelism. Does nothing where torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
