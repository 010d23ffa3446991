"""One denoising forward of a full-size Wan 2.1 transformer (random weights, bf16) on N GPUs with
diffusers' context parallelism (Ulysses over all ranks): dense (stock processors, cuDNN SDPA)
against sapattn at a fixed density, with and without head balancing. Per rank it measures the
time spent in sapattn's sequence-parallel attention (CUDA events around each call) and reports
the slowest rank against the mean. With one GPU it runs the model without context parallelism
(the single-GPU reference for the scaling efficiency T1 / (N * TN)).

    torchrun --nproc_per_node 8 bench/sp_forward.py --model wan14b --density 0.15
    python3 bench/sp_forward.py --model wan13b                     # one GPU

Rank 0 prints one JSON object and a markdown row. Keep NCCL_NVLS_ENABLE=0 (the device tool's
machines set it: NVLink multicast stays off)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_forward import MODELS, build  # noqa: E402  (same models and inputs as the 1-GPU benchmark)
from harness import emit, time_cuda  # noqa: E402


def forward_ms(model, inputs, reps):
    """Median ms of `reps` forwards after one warm-up, every rank starting each one together."""

    def forward():
        with torch.no_grad():
            model(**inputs)

    def together():
        dist.barrier()
        torch.cuda.synchronize()

    return time_cuda(forward, 1, reps, before=together)[0]


class AttentionTimer:
    """Wraps SequenceParallelSVG2.attention with CUDA events; total() syncs and sums."""

    def __init__(self):
        from sapattn.parallel import SequenceParallelSVG2

        self.cls = SequenceParallelSVG2
        self.original = SequenceParallelSVG2.attention
        self.events = []
        timer = self

        def timed(sp, *args, **kwargs):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = timer.original(sp, *args, **kwargs)
            b.record()
            timer.events.append((a, b))
            return out

        SequenceParallelSVG2.attention = timed

    def reset(self):
        self.events = []

    def total(self):
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events)

    def remove(self):
        self.cls.attention = self.original


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan14b", choices=sorted(MODELS))
    p.add_argument("--density", type=float, default=0.15)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    import sapattn
    import sapattn.diffusers as sd
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "RANK" in os.environ:
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    model, inputs = build(args.model)
    if world > 1:
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    row = dict(model=args.model, gpus=world, device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
               density_target=args.density, torch=torch.__version__)
    timer = AttentionTimer() if world > 1 else None
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["dense_ms"] = forward_ms(model, inputs, args.reps)
        preset = getattr(sapattn.SVG2Config, MODELS[args.model]["preset"])
        config = preset(first_times_fp=0.0).with_fixed_density(args.density)
        for balanced in (False, True):
            controller = sd.enable(model, config)
            with torch.no_grad():
                model(**inputs)  # the initialising forward (50 k-means iterations)
            for sp in controller._parallel.values():
                sp.balance_heads = balanced
                sp.threshold = 1.02
            controller.end_step()  # a step ends: balancing acts on the measured costs
            if timer:
                timer.reset()
            key = "balanced" if balanced else "unbalanced"
            row[f"sparse_{key}_ms"] = forward_ms(model, inputs, args.reps)
            if timer:
                mine = torch.tensor([timer.total() / (args.reps + 1)], device="cuda")
                every = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(every, mine)
                per_rank = [float(t) for t in every]
                row[f"attention_{key}_ms_per_rank"] = per_rank
                row[f"attention_{key}_max_over_mean"] = max(per_rank) / (sum(per_rank) / world)
            sd.disable(model)
    if timer:
        timer.remove()
    if rank == 0:
        emit(**row)
        print(f"| {row['model']} | {world} | {row['dense_ms']:.0f} | {row['sparse_unbalanced_ms']:.0f} | "
              f"{row['sparse_balanced_ms']:.0f} | {row.get('attention_unbalanced_max_over_mean', 1.0):.3f} | "
              f"{row.get('attention_balanced_max_over_mean', 1.0):.3f} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
