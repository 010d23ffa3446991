#!/usr/bin/env python3
"""Can a Lloyd iteration assign each point against a few candidate centroids, exactly? A CPU study.

After the first iteration every point has a label a. Candidate assignment computes, per cluster a,
its m nearest centroids N(a) (a itself among them; a Cq x Cq or Ck x Ck distance matrix, tiny) and
r_a, the distance from c_a to its (m+1)-th nearest; each point of cluster a is then measured against
N(a) only (for points sorted by label, a dense GEMM of the cluster's rows against m gathered
centroids). By the triangle inequality every centroid j outside N(a) has
    d(x, c_j) >= d(c_a, c_j) - d(x, c_a) >= r_a - d(x, c_a),
so when the best candidate distance d* is strictly below r_a - d(x, c_a), no outside centroid can be
as close: the label is exactly the full argmin (ties included, since outside ones are strictly
farther). Points that fail the test take the full assignment (a compacted list). The work of an
iteration is then about m / C of a full one plus the failing share.

Per iteration of the default first call (greedy k-means++ on 2C sampled tokens, then 14 Lloyd
iterations; study's gpp2 draws) and 2 more (a warm step without drift), for Q and K of each head,
this prints: the share of points the test certifies for each m, the share whose full argmin lies in
N(a) at all (what an uncertified candidate assignment would get right), and the cost relative to a
full iteration, (m + failing share x C) / C. Distances in float64 from the same centroids the fp32
matrix-form assignment of kmeans_first_call.py produces (that module's Points, assign, update).

    build-cli/sapattn gen --preset wan-1.3b-480p --seed 1 --out /tmp/kinit/w13
    python tools/studies/kmeans_candidates.py --workload /tmp/kinit/w13 --clusters 200,1000 --heads 0,1,2
    python tools/studies/kmeans_candidates.py --workload /tmp/kinit/w13 --clusters 200,1000 --heads 0,1,2 \
        --iters 16 --m 32,32@3,48,64 --compare --out cand-w13.jsonl
    python tools/studies/kmeans_candidates.py --report cand-w13.jsonl

--warm runs a first call in full, adds noise to the tokens (--drift, in units of each dimension's
spread) as a stand-in for the next step, and compares its 2 warm iterations in full against a full
one followed by one against m candidates (objective and labels).

--compare runs exact Lloyd and candidate Lloyd (every point against its label's m candidates only,
uncertified, from iteration F on: "m@F", F = 2 by default) from the same start side by side and
writes, at iterations 14 and --iters, each run's objectives relative to exact Lloyd's, the share of
labels equal to exact Lloyd's, and SVG2's selection at top-p 0.9 (density, recall: the Judge of
kmeans_first_call.py, 512 sampled query rows).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kmeans_first_call import (K_SEED_STREAM, Judge, Points, assign, head_tensors, load_workload,  # noqa: E402
                               objective, start, update)


def candidate_stats(x64: torch.Tensor, cent: torch.Tensor, labels: torch.Tensor, ms, chunk: int = 8192):
    """For centroids `cent` and the previous labels: per m, the shares of points certified and of
    points whose full argmin is among N(label)."""
    c64 = cent.double()
    cc = torch.cdist(c64, c64)  # [C, C]
    order = cc.argsort(dim=1)  # nearest first; column 0 is the cluster itself
    n = x64.shape[0]
    cert = {m: 0 for m in ms}
    inside = {m: 0 for m in ms}
    c_sq = (c64 * c64).sum(1)
    for lo in range(0, n, chunk):
        x = x64[lo:lo + chunk]
        a = labels[lo:lo + chunk]
        d2 = ((x * x).sum(1, keepdim=True) - 2 * x @ c64.T + c_sq).clamp(min=0)  # [chunk, C]
        best = d2.argmin(1)  # ties to the lower index, as the kernels
        d_own = d2.gather(1, a[:, None])[:, 0].sqrt()
        for m in ms:
            cand = order[a, :m]  # [chunk, m]
            r = cc.gather(1, order[:, m:m + 1])[:, 0][a]  # distance to the (m+1)-th nearest
            dc = d2.gather(1, cand)
            d_star = dc.min(1).values.sqrt()
            cert[m] += int((d_star < r - d_own).sum())
            inside[m] += int((cand == best[:, None]).any(1).sum())
    return {m: cert[m] / n for m in ms}, {m: inside[m] / n for m in ms}


def study_tensor(p: Points, start_name: str, rng_seed: int, iters: int, ms):
    cent, _ = start(p, start_name, rng_seed)
    labels, _ = assign(p, cent)
    cent, _ = update(p, labels, cent)
    rows = []
    for it in range(2, iters + 1):
        cert, inside = candidate_stats(p.x64, cent, labels, ms)
        rows.append({"iteration": it, "certified": cert, "argmin_in_candidates": inside,
                     "cost": {m: (m + (1 - cert[m]) * p.C) / p.C for m in ms}})
        labels, _ = assign(p, cent)
        cent, _ = update(p, labels, cent)
    return rows


def assign_candidates(p: Points, cent: torch.Tensor, labels: torch.Tensor, m: int, chunk: int = 8192):
    """Each point against the m nearest centroids of its label's centroid only (uncertified), in the
    fp32 matrix form of `assign`, ties to the lower centroid index."""
    cc = torch.cdist(cent.double(), cent.double())
    cand = cc.argsort(dim=1)[:, :m].sort(dim=1).values  # [C, m], ascending index: ties to the lower
    half = 0.5 * (cent * cent).sum(1)
    n = p.x.shape[0]
    out = torch.empty(n, dtype=torch.int64)
    for lo in range(0, n, chunk):
        x, a = p.x[lo:lo + chunk], labels[lo:lo + chunk]
        cols = cand[a]  # [chunk, m]
        d = half[cols] - torch.einsum("nd,nmd->nm", x, cent[cols])
        out[lo:lo + chunk] = cols.gather(1, d.argmin(1, keepdim=True))[:, 0]
    return out


def chain(p: Points, start_name: str, rng_seed: int, iters: int, spec: str | None, keep):
    """Lloyd from the start, every assignment full (spec None) or, from iteration F on, against m
    candidates (spec "m" or "m@F"; F is 2 by default: the first iteration has no labels)."""
    m, first = (None, 0) if spec is None else (int(spec.split("@")[0]), int((spec + "@2").split("@")[1]))
    cent, _ = start(p, start_name, rng_seed)
    labels = None
    states = {}
    for it in range(1, iters + 1):
        full = m is None or it < first
        labels = assign(p, cent)[0] if full else assign_candidates(p, cent, labels, m)
        cent, sizes = update(p, labels, cent)
        if it in keep:
            states[it] = (labels, cent, sizes, objective(p, cent, labels))
    return states


def compare(args, meta, handle, clusters, h: int, specs) -> None:
    """Exact Lloyd against candidate Lloyd from the same start: objectives, labels, SVG2's selection."""
    q, k, k_all = head_tensors(meta, handle, h)
    pq, pk = Points(q, clusters[0], args.seed, h), Points(k, clusters[1], args.seed ^ K_SEED_STREAM, h)
    rows = np.sort(np.random.default_rng(7 + h).choice(q.shape[0], size=min(512, q.shape[0]), replace=False))
    judge = Judge(q, k_all, k.shape[0], meta["prompt_length"], rows, 1.0 / math.sqrt(q.shape[1]))
    keep = (14, args.iters)
    runs = {}
    for m in [None] + specs:
        t0 = time.time()
        runs[m] = [chain(p, args.start, 1000 * h + tag + 10**6 * args.seed, args.iters, m, keep)
                   for p, tag in ((pq, 1), (pk, 2))]
        print(f"  head {h} m={m}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    base = runs[None]
    for m in [None] + specs:
        for it in keep:
            (sq, sk), (bq, bk) = (r[it] for r in runs[m]), (r[it] for r in base)
            density, recall = judge.outcome(sq, sk)
            row = {"preset": meta["preset"], "head": h, "kind": meta["head_kinds"][h], "clusters": clusters,
                   "start": args.start, "candidates": m or "full", "iteration": it, "obj_q": sq[3], "obj_k": sk[3],
                   "rel_obj_q": sq[3] / bq[3], "rel_obj_k": sk[3] / bk[3],
                   "same_labels_q": float((sq[0] == bq[0]).double().mean()),
                   "same_labels_k": float((sk[0] == bk[0]).double().mean()), "density": density, "recall": recall}
            print(json.dumps(row), file=args.out_file, flush=True)


def warm(args, meta, handle, clusters, h: int, specs) -> None:
    """A warm step after a first call, on points that drifted: the first call's schedule (full Lloyd,
    --iters) on the head's tokens, then the tokens plus Gaussian noise of --drift times each
    dimension's spread (a crude stand-in for the next denoising step) and 2 iterations from the
    cached centroids: in full, or the second against m candidates. Objectives and labels against the
    full step's."""
    q, k, _ = head_tensors(meta, handle, h)
    for tensor, x, C, seed, tag in (("q", q, clusters[0], args.seed, 1), ("k", k, clusters[1], args.seed ^ K_SEED_STREAM, 2)):
        p = Points(x, C, seed, h)
        first = chain(p, args.start, 1000 * h + tag + 10**6 * args.seed, args.iters, None, (args.iters,))[args.iters]
        for drift in args.drift:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(99 + h)) * x.std(0, keepdim=True)
            moved = Points(x + drift * noise, C, seed, h)
            rows = {}
            for spec in [None] + specs:
                cent = first[1].clone()
                labels = assign(moved, cent)[0]
                cent, _ = update(moved, labels, cent)
                labels = assign(moved, cent)[0] if spec is None else assign_candidates(moved, cent, labels, int(spec))
                cent, _ = update(moved, labels, cent)
                rows[spec] = (labels, objective(moved, cent, labels))
            for spec in specs:
                print(json.dumps({"preset": meta["preset"], "head": h, "tensor": tensor, "clusters": C, "drift": drift,
                                  "candidates": int(spec), "rel_obj": rows[spec][1] / rows[None][1],
                                  "same_labels": float((rows[spec][0] == rows[None][0]).double().mean())}),
                      file=args.out_file, flush=True)


def report(paths) -> None:
    """Per preset, candidate spec and iteration: mean / worst over heads of each ratio to exact Lloyd
    of the same head (objective, density), the label agreement and the recall difference."""
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    full = {(r["preset"], r["head"], r["iteration"]): r for r in rows if r["candidates"] == "full"}
    groups = {}
    for r in rows:
        if r["candidates"] == "full":
            continue
        b = full[(r["preset"], r["head"], r["iteration"])]
        groups.setdefault((r["preset"], r["candidates"], r["iteration"]), []).append(
            (r["rel_obj_q"], r["rel_obj_k"], r["same_labels_q"], r["same_labels_k"], r["density"] / b["density"],
             r["recall"] - b["recall"]))
    print("| preset | candidates | iteration | objective Q | objective K | same labels Q | same labels K "
          "| density | recall (difference) | heads |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (preset, spec, it), g in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        a = np.array(g)
        worst = [a[:, 0].max(), a[:, 1].max(), a[:, 2].min(), a[:, 3].min(), a[:, 4].max(), a[:, 5].min()]
        cells = [f"{m:.4f} / {w:.4f}" for m, w in zip(a.mean(0), worst)]
        cells[5] = f"{a[:, 5].mean():+.4f} / {worst[5]:+.4f}"
        print(f"| {preset} | {spec} | {it} | " + " | ".join(cells) + f" | {len(g)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload")
    ap.add_argument("--report", nargs="+", metavar="JSONL", help="print the table of --compare runs")
    ap.add_argument("--clusters", default="200,1000", help="Cq,Ck")
    ap.add_argument("--heads", default="0,1,2")
    ap.add_argument("--start", default="gpp2", help="a kmeans_first_call.py start")
    ap.add_argument("--iters", type=int, default=16, help="Lloyd iterations in all (14 first-call + 2 warm)")
    ap.add_argument("--m", default="8,16,32,64",
                    help="candidate counts; with --compare also m@F: candidates from iteration F on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm", action="store_true",
                    help="a warm step on drifted tokens: 2 iterations in full against 1 full + 1 with candidates")
    ap.add_argument("--drift", type=float, nargs="+", default=[0.05, 0.2],
                    help="with --warm: the noise added to the tokens, in units of each dimension's spread")
    ap.add_argument("--compare", action="store_true",
                    help="run exact and candidate Lloyd (uncertified, each --m) side by side instead")
    ap.add_argument("--out", help="append JSON lines here (default: stdout)")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return
    if not args.workload:
        ap.error("--workload is required (or --report)")
    torch.set_num_threads(2)
    meta, handle = load_workload(Path(args.workload))
    clusters = [int(c) for c in args.clusters.split(",")]
    out = open(args.out, "a") if args.out else sys.stdout
    args.out_file = out
    if args.warm:
        for h in (int(v) for v in args.heads.split(",")):
            warm(args, meta, handle, clusters, h, [m for m in args.m.split(",") if m])
        return
    if args.compare:
        for h in (int(v) for v in args.heads.split(",")):
            compare(args, meta, handle, clusters, h, [m for m in args.m.split(",") if m])
        return
    ms = [int(m) for m in args.m.split(",")]
    for h in (int(v) for v in args.heads.split(",")):
        q, k, _ = head_tensors(meta, handle, h)
        for tensor, x, C, seed, tag in (("q", q, clusters[0], args.seed, 1), ("k", k, clusters[1], args.seed ^ K_SEED_STREAM, 2)):
            t0 = time.time()
            p = Points(x, C, seed, h)
            rows = study_tensor(p, args.start, 1000 * h + tag + 10**6 * args.seed, args.iters, ms)
            for r in rows:
                print(json.dumps({"preset": meta["preset"], "head": h, "kind": meta["head_kinds"][h], "tensor": tensor,
                                  "clusters": C, "start": args.start, **r}), file=out, flush=True)
            print(f"  head {h} {tensor}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
