#!/usr/bin/env python3
"""How much of kmeans_seed_greedy's distance work decides anything? A CPU study (docs/cuda.md,
"kmeans_seed_greedy", the cluster kernel's screen).

Greedy k-means++ on a random sample of 2C tokens of one head of a generator workload (float64, numpy
draws: another draw of the op's method, as tools/studies/kmeans_first_call.py's gpp2), counting over
the whole seeding, per (point, trial) pair of every step:
  - live:      the point's current distance D2 is above zero (a chosen point never counts again);
  - improving: the trial's distance is below D2 (the only pairs that change a potential or a D2);
  - listed:    the cluster kernel's screen cannot clear the pair: its floor
               n_x + n_c - 2 x.c - 2^-9 (n_x + n_c) (src/cuda/kmeans/seed_screen.hpp) is below D2;
  - partial:   the share of a warp's work left if each warp of 32 live points stopped a trial once
               every lane's partial sum over the first k dimensions (checked every 32) passed its D2.
Shares are of all pairs unless said otherwise.

    build/sapattn gen --preset wan-1.3b-480p --seed 1 --out /tmp/w13
    python tools/studies/kmeans_seed_work.py --workload /tmp/w13 --tensor k --heads 0,1,2 --clusters 1000
    python tools/studies/kmeans_seed_work.py --workload /tmp/w13 --tensor q --heads 0,1,2 --clusters 300
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

MARGIN = 2.0**-9  # seed_screen.hpp's kMargin
CHECK = 32  # dimensions between the partial-sum checks


def seeding_work(x: np.ndarray, clusters: int, rng: np.random.Generator) -> dict[str, float]:
    sample = x[rng.choice(x.shape[0], min(x.shape[0], 2 * clusters), replace=False)]
    m, dim = sample.shape
    trials = 2 + int(math.log(clusters))
    norms = (sample * sample).sum(1)
    d2 = ((sample - sample[0]) ** 2).sum(1)
    counts = dict(pairs=0, live=0, improving=0, listed=0, partial=0.0, partial_full=0.0)
    for _ in range(1, clusters):
        live = np.nonzero(d2 > 0)[0]
        warps = rng.permutation(live)
        best = None
        for j in rng.choice(m, trials, p=d2 / d2.sum()):
            squares = (sample - sample[j]) ** 2
            prefix = np.cumsum(squares, axis=1)
            distance = prefix[:, -1]
            total = norms + norms[j]
            floor = (total - 2 * (sample @ sample[j])) - total * MARGIN
            counts["pairs"] += m
            counts["live"] += len(live)
            counts["improving"] += int((distance[live] < d2[live]).sum())
            counts["listed"] += int((floor[live] < d2[live]).sum())
            need = np.full(m, dim)
            for k in reversed(range(CHECK, dim, CHECK)):
                need = np.where(prefix[:, k - 1] >= d2, k, need)
            for w in range(0, len(warps), 32):
                counts["partial"] += need[warps[w : w + 32]].max()
                counts["partial_full"] += dim
            candidate = np.minimum(d2, distance)
            potential = candidate.sum()
            if best is None or potential < best[0]:
                best = (potential, candidate)
        d2 = best[1]
    pairs = counts["pairs"]
    return {
        "live": counts["live"] / pairs,
        "improving": counts["improving"] / pairs,
        "listed": counts["listed"] / pairs,
        "listed_of_live": counts["listed"] / counts["live"],
        "improving_of_live": counts["improving"] / counts["live"],
        "partial_of_live": counts["partial"] / counts["partial_full"],
        "partial": counts["partial"] / counts["partial_full"] * counts["live"] / pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, required=True, help="a folder written by sapattn gen")
    parser.add_argument("--tensor", default="k", help="q or k")
    parser.add_argument("--heads", default="0,1,2")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from safetensors import safe_open

    with safe_open(str(args.workload / "workload.safetensors"), framework="pt") as f:
        tensor = f.get_tensor(args.tensor)
    for head in (int(h) for h in args.heads.split(",")):
        x = tensor[0, head].float().numpy().astype(np.float64)  # [N, D]
        mean = x.mean(0)
        shares = seeding_work(x, args.clusters, np.random.default_rng(args.seed))
        print(
            f"{args.tensor} head {head}, C {args.clusters}: |mean|^2 / mean |x|^2 "
            f"{(mean @ mean) / (x * x).sum(1).mean():.3f}; "
            + ", ".join(f"{k} {v:.4f}" for k, v in shares.items())
        )


if __name__ == "__main__":
    main()
