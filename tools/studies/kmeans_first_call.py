#!/usr/bin/env python3
"""Which k-means schedule should a layer's first sparse call run? A CPU study.

Today the first call samples centroids (kmeans_init) and runs 50 Lloyd iterations over every point
(235 ms per layer at Wan 14B 720p on an H100; the goal is 60 ms). This script runs that baseline and
cheaper schedules on the generator's workloads, one head at a time at full size, and reports per
schedule, relative to the baseline of the same head:
  - the k-means objective sum ||x - c(x)||^2 of Q and of K (labels of the last assignment, centroids
    after the last update: the state the layer call selects with);
  - SVG2's selection at top-p 0.9: density (kept video query-key pairs / Nq Nk) and recall (softmax
    mass of the kept keys, exact, averaged over sampled query rows; HunyuanVideo's prompt keys count
    as kept, as the text rule keeps them for every video query);
  - the cost in full-iteration equivalents: an iteration over 1/f of the points costs 1/f, k-means++
    on M*C points M*C/N times its candidates per step (its distance work; its GPU time is set by its
    C sequential steps instead, see docs/cuda.md); Q and K are weighted by their cluster counts.

A schedule is a start followed by N full Lloyd iterations, the same on Q and on K:
  sample+N          kmeans_init's sample, then N iterations (sample+50 is today's baseline)
  subF:NS+N         the sample, NS iterations on every F-th token (a strided view), then N
  rsubF:NS+N        the same on a random 1/F of the tokens (the first ranks of kmeans_init's keys)
  ppM+N             k-means++ seeding on a random sample of M*C tokens (the first ranks of the keys)
  gppM+N            greedy k-means++ (2 + ln C candidates per step, the best kept) on M*C tokens
  opgppM+N          the same as the op kmeans_seed_greedy runs it (its splitmix64 draws, fp32 distances
                    and fixed-point sums: the seeds of sapattn's default first call); gppM draws with
                    numpy's generator in float64, as the committed runs did
  ppM/rsubF:NS+N    stages chain with '/'
  START+stopE       full iterations until the assignment objective changes by less than E (relative)
                    from one iteration to the next: a device-side flag, later iterations do no work
  NAME@seedS        the same with SVG2Config.seed S (--seed): another sample, compared with seed 0's
                    baseline, which shows how much the baseline itself moves
--hamerly START counts, along that start's full iterations, the distance computations Hamerly's
bounds would skip (points, and whole 32-row warp tiles or 256-row blocks in token order and in the
order of the previous labels); the labels are Lloyd's either way.

The project's method is what runs: kmeans_init's sample is computed bit for bit (splitmix64 keys);
the assignment uses the matrix form ||c||^2/2 - x.c in fp32 (the CUDA tensor-core path's form; the
CPU op's exact sums are ~5x slower here); updates are fp64 means, empty clusters keep their centroid;
selection follows select_blocks. --validate checks this against the project's CPU ops
(torch.ops.sapattn.kmeans: the sample, Lloyd, and kmeans_seed_greedy's seeds against opgpp's;
sapattn.svg2_attention's density and LSE). Seeds are fixed: the sample
(--seed), the k-means++ draws (head, tensor, seed) and the recall rows (head).

--report prints, per schedule, mean / worst over heads of each ratio and how many heads meet the
bar (objective <= baseline, density <= 1.01 x, recall >= 0.99 x), and how many shapes meet
it on the mean over their heads (objective still on every head). The runs of docs/cuda.md:

    build/sapattn gen --preset wan-14b-720p --seed 1 --out /tmp/w14      # likewise the other presets
    python tools/studies/kmeans_first_call.py --workload /tmp/w14 --clusters 300,1000 --hamerly sample,pp4 \
        --out out/kinit/wan14b-720p.jsonl             # 200,1000 for wan-1.3b-480p; 400,1000 for hunyuan-720p
    python tools/studies/kmeans_first_call.py --workload /tmp/w14 --clusters 300,1000 --seed 1 --starts "" \
        --stops "" --out out/kinit/wan14b-720p-seeds.jsonl
    python tools/studies/kmeans_first_call.py --report out/kinit/*.jsonl   # or bench/results/*kmeans-first-call*
    python tools/studies/kmeans_first_call.py --validate /tmp/tiny    # a small workload: every check
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

K_SEED_STREAM = 0x5BD1E9955BD1E995  # sapattn/config.hpp key_sample_seed: the keys' sample stream
DRAW_STREAM = 0x243F6A8885A308D3  # src/core/kmeans_seeding.hpp: kmeans_seed_greedy's draws
MASK64 = (1 << 64) - 1
BASE_ITERS = 50
TOP_P, MIN_KC_RATIO = 0.9, 0.10
BASE_CHECKPOINTS = (4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 30, 40, 50)
DEFAULT_STARTS = "sub4:20,rsub8:30,pp2,pp4,pp8,gpp2,pp4/rsub2:12"


# ------------------------------------------------------------------------------------------------
# The project's method, replicated
# ------------------------------------------------------------------------------------------------
def splitmix64(z: np.ndarray) -> np.ndarray:
    """src/cpu/kmeans.cpp's splitmix64 on uint64 arrays (arithmetic mod 2^64)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_order(n: int, seed: int, problem: int) -> torch.Tensor:
    """kmeans_init's order: point i gets splitmix64(seed ^ splitmix64(problem * 2^32 + i)); the C
    smallest keys are the initial centroids. Its first ranks are also a free random subsample."""
    i = np.arange(n, dtype=np.uint64)
    keys = splitmix64(np.uint64(seed) ^ splitmix64((np.uint64(problem) << np.uint64(32)) + i))
    return torch.from_numpy(np.argsort(keys, kind="stable"))


class Points:
    """One head's video queries or keys [N, D] fp32 (from bf16) and kmeans_init's sample of C."""

    def __init__(self, x: torch.Tensor, clusters: int, seed: int, problem: int):
        self.x, self.x64, self.C = x, x.double(), clusters
        self.seed, self.problem = seed, problem
        self.sq = (self.x64 * self.x64).sum(1)
        self.order = sample_order(x.shape[0], seed, problem)
        self.init = x[self.order[torch.arange(clusters) % x.shape[0]]].clone()  # C > N: centroid c, point c mod N

    def subset(self, rows: torch.Tensor | slice) -> "Points":
        sub = Points.__new__(Points)
        sub.x, sub.x64, sub.sq, sub.C = self.x[rows].contiguous(), self.x64[rows], self.sq[rows], self.C
        return sub


def assign(p: Points, cent: torch.Tensor, prev: torch.Tensor | None = None, chunk: int = 8192):
    """argmin_c ||x - c||^2 as argmin_c (||c||^2/2 - x.c) in fp32, ties to the lower index. Returns
    labels and squared distances [N]; with prev labels also the second-best and the distance to the
    previous centroid (Hamerly's bookkeeping)."""
    half = 0.5 * (cent * cent).sum(1)
    n = p.x.shape[0]
    labels, best = torch.empty(n, dtype=torch.int64), torch.empty(n)
    second, to_prev = (torch.empty(n), torch.empty(n)) if prev is not None else (None, None)
    for lo in range(0, n, chunk):
        d = torch.addmm(half, p.x[lo:lo + chunk], cent.T, alpha=-1.0)  # [chunk, C]
        best[lo:lo + chunk], labels[lo:lo + chunk] = d.min(1)
        if prev is not None:
            second[lo:lo + chunk] = d.topk(2, dim=1, largest=False, sorted=True).values[:, 1]
            to_prev[lo:lo + chunk] = d.gather(1, prev[lo:lo + chunk, None])[:, 0]
    sq = p.sq.float()
    out = [labels, (sq + 2 * best).clamp(min=0)]
    if prev is not None:
        out += [(sq + 2 * second).clamp(min=0), (sq + 2 * to_prev).clamp(min=0)]
    return out


def update(p: Points, labels: torch.Tensor, cent: torch.Tensor):
    """Centroids become fp64 means rounded to fp32; an empty cluster keeps its centroid."""
    sizes = torch.bincount(labels, minlength=p.C)
    sums = torch.zeros(p.C, p.x.shape[1], dtype=torch.float64).index_add_(0, labels, p.x64)
    means = (sums / sizes.clamp(min=1)[:, None]).float()
    return torch.where(sizes[:, None] > 0, means, cent), sizes


def objective(p: Points, cent: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((p.x64 - cent.double()[labels]) ** 2).sum())


class Hamerly:
    """Counts what Hamerly's bounds would skip along a Lloyd run: a point whose upper bound u on the
    distance to its centroid is below max(l, s(a)) (l a lower bound on the second-closest, s(a) half
    the distance from its centroid to the nearest other) keeps its label unexamined; otherwise u is
    tightened (1 distance) and, if still above, all C distances are computed."""

    def __init__(self):
        self.u = self.l = None
        self.rows = []

    def step(self, labels_prev, cent, d_best, d_second, d_prev):
        if self.u is None:  # the first iteration computes everything
            self.u, self.l = d_best.sqrt(), d_second.sqrt()
            self.rows.append({"points": 1.0, "warp": 1.0, "block": 1.0, "warp_sorted": 1.0, "block_sorted": 1.0})
            return
        cc = torch.cdist(cent.double(), cent.double())
        cc.fill_diagonal_(float("inf"))
        s = 0.5 * cc.min(1).values.float()
        bound = torch.maximum(self.l, s[labels_prev])
        tight = d_prev.sqrt()
        full = (self.u > bound) & (tight > bound)
        self.u = torch.where(full, d_best.sqrt(), torch.where(self.u > bound, tight, self.u))
        self.l = torch.where(full, d_second.sqrt(), self.l)
        order = torch.argsort(labels_prev, stable=True)  # the update's sort groups points by cluster

        def tiles(flags, size):
            n = flags.shape[0] // size * size
            return float(flags[:n].view(-1, size).any(1).double().mean())

        self.rows.append({"points": float(full.double().mean()), "warp": tiles(full, 32), "block": tiles(full, 256),
                          "warp_sorted": tiles(full[order], 32), "block_sorted": tiles(full[order], 256)})

    def moved(self, labels, old, new):
        drift = (new - old).double().norm(dim=1).float()
        top = drift.topk(min(2, drift.shape[0])).values
        other_max = torch.where(drift[labels] == top[0], top[-1], top[0])
        self.u = self.u + drift[labels]
        self.l = self.l - other_max


def lloyd(p: Points, cent: torch.Tensor, iters: int, keep=(), stops=(), hamerly: Hamerly | None = None):
    """`iters` Lloyd iterations. Returns {n: (labels, centroids, sizes, objective)} for n in keep, the
    last n and each stop's n, and {eps: n}: the iteration at which the relative change of the
    assignment objective (sum of the distances the assignment found, free on a GPU) fell below eps."""
    states, stop_at, prev_j = {}, {}, None
    labels = None
    for n in range(1, iters + 1):
        if hamerly is not None and labels is not None:
            new_labels, d_best, d_second, d_prev = assign(p, cent, labels)
            hamerly.step(labels, cent, d_best, d_second, d_prev)
        elif hamerly is not None:  # the first iteration: no previous labels (centroid 0 stands in)
            new_labels, d_best, d_second, _ = assign(p, cent, torch.zeros(p.x.shape[0], dtype=torch.int64))
            hamerly.step(None, cent, d_best, d_second, None)
        else:
            new_labels, d_best = assign(p, cent)
        labels = new_labels
        j = float(d_best.double().sum())
        fresh = [e for e in stops if e not in stop_at and prev_j is not None and (prev_j - j) / j < e]
        stop_at.update({e: n for e in fresh})
        prev_j = j
        old = cent
        cent, sizes = update(p, labels, cent)
        if hamerly is not None:
            hamerly.moved(labels, old, cent)
        if n in keep or n == iters or fresh:
            states[n] = (labels, cent, sizes, objective(p, cent, labels))
    for e in stops:  # never converged: the stop runs every iteration
        stop_at.setdefault(e, iters)
    return states, stop_at


def select_blocks(cq: np.ndarray, ck: np.ndarray, k_sizes: np.ndarray, scale: float, top_p: float,
                  min_kept: int) -> np.ndarray:
    """src/cpu/select.cpp: P_ij = |K_j| exp(S_ij - m_i) / sum (m_i over non-empty clusters), each row
    ranked descending (ties to the lower index), the shortest prefix whose fp32 running sum reaches
    top_p, at least min_kept. Returns the mask [Cq, Ck] bool."""
    s = (cq @ ck.T).astype(np.float32) * np.float32(scale)
    nonempty = k_sizes > 0
    m = np.where(nonempty[None], s, -np.inf).max(1, keepdims=True)
    e = np.exp((s - m).astype(np.float64)).astype(np.float32)
    w = np.where(nonempty[None], k_sizes.astype(np.float32)[None] * e, np.float32(0))
    w = w / np.cumsum(w, axis=1, dtype=np.float32)[:, -1:]  # the row total as a sequential fp32 sum
    order = np.argsort(-w, axis=1, kind="stable")
    running = np.cumsum(np.take_along_axis(w, order, 1), axis=1, dtype=np.float32)
    reached = running >= np.float32(top_p)
    kept = np.where(reached.any(1), reached.argmax(1) + 1, w.shape[1])
    kept = np.minimum(np.maximum(kept, min_kept), w.shape[1])
    mask = np.zeros_like(w, dtype=bool)
    np.put_along_axis(mask, order, np.arange(w.shape[1])[None] < kept[:, None], 1)
    return mask


def kmeans_pp(xs: torch.Tensor, C: int, rng: np.random.Generator, trials: int = 1) -> torch.Tensor:
    """k-means++ (D^2 sampling) on the sample xs [M, D], from its first point: C sequential steps of
    M distances per trial. trials > 1 is greedy k-means++ (scikit-learn's): each step draws that many
    candidates and keeps the one that lowers the sample's potential most."""
    xs64 = xs.double()
    chosen, d2 = [0], ((xs64 - xs64[0]) ** 2).sum(1)
    for _ in range(1, C):
        cum = torch.cumsum(d2, 0)
        targets = torch.tensor(rng.random(trials) * float(cum[-1]), dtype=torch.float64)
        cand = torch.searchsorted(cum, targets).clamp(max=xs.shape[0] - 1)
        d2c = torch.minimum(d2[None], torch.cdist(xs64[cand], xs64) ** 2)  # [trials, M]
        best = int(d2c.sum(1).argmin())
        chosen.append(int(cand[best]))
        d2 = d2c[best]
    return xs[chosen].clone()


def splitmix64_int(z: int) -> int:
    """splitmix64 of one Python integer (arithmetic mod 2^64)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def squared_distances_f32(xs: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The CPU op's fp32 ||x - c||^2 for every row of xs [M, D] float32 (src/cpu/kmeans.cpp): 8 partial
    sums over d mod 8 in order, the tail into sum 0, combined ((0+1)+(2+3))+((4+5)+(6+7)); numpy's
    float32 operations round as the C++ ones do."""
    sq = np.square(xs - c)
    full = xs.shape[1] // 8 * 8
    part = np.zeros((xs.shape[0], 8), np.float32)
    for d0 in range(0, full, 8):
        part += sq[:, d0:d0 + 8]
    for d in range(full, xs.shape[1]):
        part[:, 0] += sq[:, d]
    return ((part[:, 0] + part[:, 1]) + (part[:, 2] + part[:, 3])) + ((part[:, 4] + part[:, 5]) + (part[:, 6] + part[:, 7]))


def greedy_seeds_op(p: Points, factor: int) -> torch.Tensor:
    """kmeans_seed_greedy as include/sapattn/ops.hpp specifies it, for problem id p.problem and
    p.seed: greedy k-means++ on the first M = min(N, factor C) tokens of kmeans_init's order, with
    splitmix64 draws and distances as 64-bit fixed-point integers (unit 2^E from the largest finite
    distance to centroid 0; non-finite ones capped). C >= N is kmeans_init's sample."""
    n, C = p.x.shape[0], p.C
    if C >= n:
        return p.init
    m = min(n, factor * C)
    xs = p.x[p.order[:m]].numpy()
    trials = 2 + int(math.log(C))
    bits = (m - 1).bit_length()
    cap = 1 << (63 - bits)
    d2 = squared_distances_f32(xs, xs[0])
    finite = d2[np.isfinite(d2)]
    largest = float(finite.max()) if finite.size else 0.0
    exponent = math.frexp(largest)[1] + bits - 63 if largest > 0 else 0  # ilogb(largest) + 1 + L - 63

    def fixed(d: np.ndarray) -> np.ndarray:
        units = np.ldexp(d.astype(np.float64), -exponent)
        out = np.full(d.shape, cap, dtype=np.uint64)
        below = units < cap  # False for NaN
        out[below] = np.floor(units[below]).astype(np.uint64)
        return out

    chosen = [0]
    for step in range(1, C):
        prefix = np.cumsum(fixed(d2), dtype=np.uint64)
        total = int(prefix[-1])
        h = splitmix64_int(p.seed ^ DRAW_STREAM ^ splitmix64_int(((p.problem << 32) + step) & MASK64))
        best = None
        for t in range(trials):
            target = (total * splitmix64_int((h + t) & MASK64)) >> 64
            j = min(int(np.searchsorted(prefix, np.uint64(target), side="right")), m - 1)
            dist = squared_distances_f32(xs, xs[j])
            cand = np.where(dist < d2, dist, d2)
            potential = int(fixed(cand).sum(dtype=np.uint64))
            if best is None or potential < best[0]:
                best = (potential, j, cand)
        chosen.append(best[1])
        d2 = best[2]
    return torch.from_numpy(xs[chosen].copy())


def start(p: Points, name: str, rng_seed: int):
    """A start's centroids and its cost in full-iteration equivalents. Stages chain with '/', e.g.
    pp4/rsub2:16 (k-means++ seeds, then 16 iterations on a random half)."""
    n, cent, cost = p.x.shape[0], p.init, 0.0
    for stage in name.split("/"):
        if stage == "sample":
            continue
        if stage.startswith("opgpp"):
            factor = int(stage[len("opgpp"):])
            cent = greedy_seeds_op(p, factor)
            cost += (2 + int(math.log(p.C))) * min(n, factor * p.C) / n
            continue
        if stage.startswith(("pp", "gpp")):
            m = min(n, int(stage.split("pp")[1]) * p.C)
            trials = 2 + int(math.log(p.C)) if stage.startswith("g") else 1
            cent = kmeans_pp(p.x[p.order[:m]], p.C, np.random.default_rng(rng_seed), trials)
            cost += trials * m / n
            continue
        f, ns = (int(v) for v in stage.split("sub")[1].split(":"))
        rows = p.order[:n // f] if stage.startswith("r") else slice(None, None, f)
        sub = p.subset(rows)
        cent = lloyd(sub, cent, ns)[0][ns][1]
        cost += ns * sub.x.shape[0] / n
    return cent, cost


# ------------------------------------------------------------------------------------------------
# Selection outcome
# ------------------------------------------------------------------------------------------------
class Judge:
    """Exact attention mass of sampled video query rows: P [R, N_video keys] of the true softmax over
    all keys (text too), and the prompt keys' mass (the text rule keeps them for video queries)."""

    def __init__(self, q: torch.Tensor, k_all: torch.Tensor, n_video: int, prompt: int, rows: np.ndarray,
                 scale: float):
        p = torch.softmax((q[rows].double() @ k_all.double().T) * scale, dim=1)
        self.rows, self.scale = torch.from_numpy(rows), scale
        self.p_video = p[:, :n_video].contiguous()
        self.prompt_mass = p[:, n_video:n_video + prompt].sum(1)

    def outcome(self, q_state, k_state):
        (lq, cq, sq, _), (lk, ck, sk, _) = q_state, k_state
        mask = select_blocks(cq.numpy(), ck.numpy(), sk.numpy(), self.scale, TOP_P,
                             int(math.floor(MIN_KC_RATIO * ck.shape[0])))
        density = float(sq.double().numpy() @ mask @ sk.double().numpy()) / (float(sq.sum()) * float(sk.sum()))
        mass = torch.zeros(self.p_video.shape[0], ck.shape[0], dtype=torch.float64).index_add_(1, lk, self.p_video)
        recall = (torch.from_numpy(mask)[lq[self.rows]].double() * mass).sum(1) + self.prompt_mass
        return density, float(recall.mean())


# ------------------------------------------------------------------------------------------------
# One head, the driver
# ------------------------------------------------------------------------------------------------
def study_head(q, k, k_all, prompt: int, head: int, clusters, starts, full_iters: int, stops, rows: int, seed: int,
               hamerly_starts=()):
    scale = 1.0 / math.sqrt(q.shape[1])
    pq = Points(q, clusters[0], seed, head)  # kmeans_init's problem id b*H + h, b = 0
    pk = Points(k, clusters[1], seed ^ K_SEED_STREAM, head)
    row_ids = np.sort(np.random.default_rng(7 + head).choice(q.shape[0], size=min(rows, q.shape[0]), replace=False))
    judge = Judge(q, k_all, k.shape[0], prompt, row_ids, scale)
    wq = clusters[0] / (clusters[0] + clusters[1])  # Q's share of a Q+K iteration's distance work
    results, extra = [], []
    for s in starts:
        iters = BASE_ITERS if s == "sample" else full_iters
        keep = [c for c in BASE_CHECKPOINTS if c <= iters]
        runs = []
        for p, tag in ((pq, 1), (pk, 2)):
            t0 = time.time()
            cent, cost = start(p, s, rng_seed=1000 * head + tag + 10**6 * seed)
            ham = Hamerly() if s in hamerly_starts else None
            states, stop_at = lloyd(p, cent, iters, keep, stops, ham)
            runs.append((states, stop_at, cost, time.time() - t0))
            if ham is not None:
                extra.append({"record": "hamerly", "start": s, "tensor": "qk"[tag - 1], "per_iteration": ham.rows})
        (sq_, stq, cq_, tq), (sk_, stk, ck_, tk) = runs
        for n in keep:
            results.append((f"{s}+{n}", sq_[n], sk_[n], wq * (cq_ + n) + (1 - wq) * (ck_ + n), n, n))
        for e in stops:
            nq, nk = stq[e], stk[e]
            results.append((f"{s}+stop{e:g}", sq_[nq], sk_[nk], wq * (cq_ + nq) + (1 - wq) * (ck_ + nk), nq, nk))
        print(f"  head {head} start {s}: {tq:.0f} + {tk:.0f} s", file=sys.stderr, flush=True)
    out = []
    for name, qs, ks, cost, nq, nk in results:
        density, recall = judge.outcome(qs, ks)
        out.append({"schedule": name, "cost": cost, "iters_q": nq, "iters_k": nk, "obj_q": qs[3], "obj_k": ks[3],
                    "density": density, "recall": recall})
    return out, extra


def load_workload(folder: Path):
    from safetensors import safe_open

    meta = json.loads((folder / "workload.json").read_text())
    return meta, safe_open(str(folder / "workload.safetensors"), framework="pt")


def head_tensors(meta, handle, h: int):
    """Video Q and K [N, D] fp32 and all keys (text too) of head h of batch item 0 ([B,H,S,D])."""
    n_video = meta["shape"][2] - meta["text_tokens"]
    q = handle.get_slice("q")[0:1, h:h + 1][0, 0].float()
    k_all = handle.get_slice("k")[0:1, h:h + 1][0, 0].float()
    return q[:n_video].contiguous(), k_all[:n_video].contiguous(), k_all


def run(args) -> None:
    meta, handle = load_workload(Path(args.workload))
    clusters = tuple(int(c) for c in args.clusters.split(","))
    starts = [s for s in args.starts.split(",") if s]
    stops = [float(e) for e in args.stops.split(",") if e]
    hamerly_starts = [s for s in args.hamerly.split(",") if s] if args.hamerly else []
    out = open(args.out, "a") if args.out else sys.stdout
    for h in (int(x) for x in args.heads.split(",")):
        t0 = time.time()
        q, k, k_all = head_tensors(meta, handle, h)
        results, extra = study_head(q, k, k_all, meta["prompt_length"], h, clusters,
                                    ([] if args.no_sample else ["sample"]) + starts, args.full_iters, stops,
                                    args.rows, args.seed, hamerly_starts)
        common = {"preset": meta["preset"], "head": h, "kind": meta["head_kinds"][h], "clusters": list(clusters),
                  "seed": args.seed}
        for r in results:
            if args.seed != 0:  # another sample: compared with seed 0's baseline by --report
                r["schedule"] += f"@seed{args.seed}"
        for r in results + extra:
            out.write(json.dumps({**r, **common}) + "\n")
        out.flush()
        print(f"{meta['preset']} head {h} ({meta['head_kinds'][h]}): {time.time() - t0:.0f} s", file=sys.stderr,
              flush=True)


def meets(r) -> bool:
    """The bar on one head: objective no worse than the baseline's, density and recall within
    1% of it (a lower density or a higher recall is no loss)."""
    base_recall = r["recall"] - r["d_recall"]
    return (r["rel_obj_q"] <= 1.0 and r["rel_obj_k"] <= 1.0 and r["rel_density"] <= 1.01
            and r["recall"] >= 0.99 * base_recall)


def meets_on_mean(rs) -> bool:
    """The bar on one shape's heads: the objective on every head, density and recall on their mean."""
    base_recall = np.mean([r["recall"] - r["d_recall"] for r in rs])
    return (all(r["rel_obj_q"] <= 1.0 and r["rel_obj_k"] <= 1.0 for r in rs)
            and np.mean([r["rel_density"] for r in rs]) <= 1.01
            and np.mean([r["recall"] for r in rs]) >= 0.99 * base_recall)


def report(paths, max_cost: float, only=None, per_preset: bool = False) -> None:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    ham = [r for r in rows if r.get("record") == "hamerly"]
    # One row per (preset, clusters, head, schedule), the last one read; relative to that head's baseline.
    unique = {(r["preset"], tuple(r["clusters"]), r["head"], r["schedule"]): r for r in rows if "schedule" in r}
    rows = []
    for (preset, clusters, head, name), r in unique.items():
        base = unique.get((preset, clusters, head, f"sample+{BASE_ITERS}"))
        if base is None or (only and name not in only + [f"sample+{BASE_ITERS}"]):
            continue
        rows.append({**r, "rel_obj_q": r["obj_q"] / base["obj_q"], "rel_obj_k": r["obj_k"] / base["obj_k"],
                     "rel_density": r["density"] / base["density"], "d_recall": r["recall"] - base["recall"]})
    presets = sorted({r["preset"] for r in rows})
    heads = {p: sorted({r["head"] for r in rows if r["preset"] == p}) for p in presets}
    for p in presets:
        base = [r for r in rows if r["preset"] == p and r["schedule"] == f"sample+{BASE_ITERS}"]
        if base:
            kinds = ", ".join(r["kind"] for r in base)
            density = ", ".join(f"{r['density']:.4f}" for r in base)
            recall = ", ".join(f"{r['recall']:.4f}" for r in base)
            print(f"{p}, heads {heads[p]} ({kinds}), clusters {base[0]['clusters']}: sample+{BASE_ITERS} density "
                  f"{density}, recall {recall}")
    print("ratios to sample+50 of the same head, mean / worst over heads; recall as a difference")
    print("| schedule | " + ("preset | " if per_preset else "") +
          "cost | obj Q | obj K | density | recall | heads meeting the bar | shapes, on the mean |")
    print("|---|" + ("---|" if per_preset else "") + "---|---|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault((r["schedule"], r["preset"] if per_preset else ""), []).append(r)
    for (name, preset), rs in sorted(by.items(), key=lambda kv: (np.mean([r["cost"] for r in kv[1]]), kv[0])):
        if (not only and np.mean([r["cost"] for r in rs]) > max_cost) or (
                not per_preset and len({r["preset"] for r in rs}) < len(presets)):
            continue

        def mw(key, worst):
            return f"{np.mean([r[key] for r in rs]):.4f} / {worst(r[key] for r in rs):.4f}"

        c = [r["cost"] for r in rs]
        shapes = sorted({r["preset"] for r in rs})
        shapes_met = sum(meets_on_mean([r for r in rs if r["preset"] == p]) for p in shapes)
        cost = f"{np.mean(c):.1f}" + (f" ({min(c):.1f}-{max(c):.1f})" if max(c) - min(c) > 0.05 else "")
        print(f"| {name} | " + (f"{preset} | " if per_preset else "") +
              f"{cost} | {mw('rel_obj_q', max)} | {mw('rel_obj_k', max)} | {mw('rel_density', max)} | "
              f"{np.mean([r['d_recall'] for r in rs]):+.4f} / {min(r['d_recall'] for r in rs):+.4f} | "
              f"{sum(meets(r) for r in rs)}/{len(rs)} | {shapes_met}/{len(shapes)} |")
    if ham:
        print("\nHamerly: work left per iteration (share of the C distances computed), mean over heads and Q/K")
        print("| start | iterations | points | 32-row warps | 256-row blocks | warps, label order | "
              "blocks, label order |")
        print("|---|---|---|---|---|---|---|")
        for s in sorted({r["start"] for r in ham}):
            hs = [r["per_iteration"] for r in ham if r["start"] == s]
            n = min(len(h) for h in hs)
            for lo, hi in ((1, 1), (2, 4), (5, 8), (9, 12), (13, 16), (17, 30), (31, 50)):
                if lo > n:
                    break
                hi = min(hi, n)
                cells = [np.mean([row[key] for h in hs for row in h[lo - 1:hi]])
                         for key in ("points", "warp", "block", "warp_sorted", "block_sorted")]
                print(f"| {s} | {lo}-{hi} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")


# ------------------------------------------------------------------------------------------------
# Validation against the project's ops
# ------------------------------------------------------------------------------------------------
def check_kmeans(p: Points, x4: torch.Tensor, seed: int, iters: int, what: str) -> None:
    """kmeans_init, kmeans_seed_greedy and `iters` Lloyd iterations of the project's op on x4 [1,N,1,D]
    (a one-head call: problem id 0, which p must use) against the replicas."""
    greedy = torch.empty(1, 1, p.C, x4.shape[3])
    torch.ops.sapattn.kmeans(x4, greedy, True, 0, seed, seeding="greedy_pp", sample_factor=2)
    assert torch.equal(greedy[0, 0], greedy_seeds_op(p, 2)), f"{what}: kmeans_seed_greedy differs from opgpp2"
    cent = torch.empty(1, 1, p.C, x4.shape[3])
    torch.ops.sapattn.kmeans(x4, cent, True, 0, seed, seeding="sample")
    assert torch.equal(cent[0, 0], p.init), f"{what}: kmeans_init differs"
    labels = torch.ops.sapattn.kmeans(x4, cent, False, iters, seed)[0, 0].long()
    states, _ = lloyd(p, p.init, iters)
    same = float((labels == states[iters][0]).double().mean())
    print(f"{what}: greedy seeds and init identical; labels after {iters} iterations {same:.4%} identical, objective "
          f"{states[iters][3] / objective(p, cent[0, 0], labels):.7f} of the op's", flush=True)


def validate(folder: Path, heads, clusters, iters: int) -> None:
    """Every workload: kmeans_init, kmeans_seed_greedy and Lloyd per head. Small workloads (<= 8192
    video tokens, all heads): also density and recall against sapattn.svg2_attention (too slow on the CPU at full size)."""
    import sapattn

    meta, handle = load_workload(folder)
    H, n_video, prompt = meta["shape"][1], meta["shape"][2] - meta["text_tokens"], meta["prompt_length"]
    small = n_video <= 8192
    cq_n, ck_n = (max(2, n_video // 80), max(4, n_video // 20)) if small else clusters
    for h in (range(H) if small else heads):
        q, k, _ = head_tensors(meta, handle, h)
        for x, C, seed, name in ((q, cq_n, 0, "q"), (k, ck_n, K_SEED_STREAM, "k")):
            check_kmeans(Points(x, C, seed, 0), x[None, :, None], seed, iters, f"head {h} {name} ({C} clusters)")
    if not small:
        return
    q4, k4, v4 = (handle.get_tensor(n).permute(0, 2, 1, 3).contiguous() for n in "qkv")  # [B,S,H,D]
    config = sapattn.SVG2Config(q_clusters=cq_n, k_clusters=ck_n, kmeans_seeding="sample", kmeans_iters_init=iters)
    _, lse, density = sapattn.svg2_attention(q4, k4, v4, config, sapattn.BranchState(),
                                             text_tokens=meta["text_tokens"], prompt_length=prompt, return_lse=True)
    _, lse_dense = sapattn.dense_attention(q4, k4, v4, return_lse=True)
    for h in range(H):
        q, k, k_all = head_tensors(meta, handle, h)
        pq, pk = Points(q, cq_n, 0, h), Points(k, ck_n, K_SEED_STREAM, h)  # svg2's problem ids b*H + h
        judge = Judge(q, k_all, n_video, prompt, np.arange(n_video), 1.0 / math.sqrt(q.shape[1]))
        dens, rec = judge.outcome(lloyd(pq, pq.init, iters)[0][iters], lloyd(pk, pk.init, iters)[0][iters])
        # The op's density counts the whole sequence; its recall of a video row is exp(lse - lse_dense).
        op_recall = float(torch.exp(lse[0, h, :n_video].double() - lse_dense[0, h, :n_video].double()).mean())
        print(f"head {h}: video density {dens:.5f} (op, whole sequence: {float(density[0, h]):.5f}), "
              f"recall {rec:.5f} (op: {op_recall:.5f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workload", help="a folder written by `sapattn gen`")
    ap.add_argument("--heads", default="0,1,2", help="head indices (default 0,1,2: positional, semantic, mixed)")
    ap.add_argument("--clusters", default="300,1000",
                    help="Cq,Ck (official scripts: 300,1000 Wan 720p; 200,1000 Wan 480p; 400,1000 HunyuanVideo)")
    ap.add_argument("--starts", default=DEFAULT_STARTS, help=f"starts besides the sample (default {DEFAULT_STARTS})")
    ap.add_argument("--no-sample", action="store_true",
                    help="skip the baseline (sample+N), e.g. when an earlier run of the same heads has it")
    ap.add_argument("--full-iters", type=int, default=24, help="full iterations after each start (default 24)")
    ap.add_argument("--stops", default="1e-3,3e-4,1e-4", help="convergence-stop thresholds (default 1e-3,3e-4,1e-4)")
    ap.add_argument("--hamerly", default="", help="starts whose full iterations Hamerly's bounds are counted on")
    ap.add_argument("--rows", type=int, default=512, help="sampled query rows for recall (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="SVG2Config.seed (kmeans_init; default 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="append JSON lines here (default: stdout)")
    ap.add_argument("--report", nargs="+", help="summarise JSON-lines files instead of running")
    ap.add_argument("--max-cost", type=float, default=20.0, help="--report: leave out schedules costing more")
    ap.add_argument("--only", help="--report: these schedules only (comma-separated)")
    ap.add_argument("--per-preset", action="store_true", help="--report: one row per schedule and preset")
    ap.add_argument("--validate", help="check the replicas against the project's ops on this workload")
    ap.add_argument("--validate-iters", type=int, default=5, help="Lloyd iterations --validate compares")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.report:
        report(args.report, args.max_cost, args.only.split(",") if args.only else None, args.per_preset)
    elif args.validate:
        validate(Path(args.validate), [int(x) for x in args.heads.split(",")],
                 tuple(int(c) for c in args.clusters.split(",")), args.validate_iters)
    elif args.workload:
        run(args)
    else:
        ap.error("give --workload, --report or --validate")


if __name__ == "__main__":
    main()
