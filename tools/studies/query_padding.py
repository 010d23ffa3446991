#!/usr/bin/env python3
"""Query padding at 64-row granularity ("no query padding waste"): a CPU study.

The Hopper kernel computes a query cluster of n rows in 64-row warpgroup blocks, ceil(n/64)*64
rows, so the rows past the cluster's end are computed and thrown away (11.1% of the computed pairs
at Wan 14B 720p). This script measures, per head of a generator workload (full size), three ways
to lay the query clusters out:

  A        SVG2 as it runs: k-means of Q (Cq) and K (Ck) from kmeans_init's sample, Lloyd
           iterations, selection at top-p 0.9 (min_kc_ratio 0.1) on the centroids after the last
           update, the labels of the last assignment.
  B:COST:SLACK[:MAX[:F[:ROUNDS]]]:keep / ...:recomp
           size-rounded query clusters: after A's last assignment, points move between query
           clusters until every cluster's tail t = n mod 64 is 0 or at least 64 - SLACK (rows of
           padding a cluster may keep). Clusters with a small tail give it away (donors), clusters
           with a large tail take 64 - t - (0..SLACK) points (receivers), cheapest moves first (a
           greedy transportation, `round_clusters`). COST is `dist`, the increase of ||x - c||^2
           (what k-means minimises), or `mass`, the point's attention mass lost by taking the
           receiver's kept key clusters instead of its own, estimated as the selection estimates
           it (the size-weighted softmax over the key centroids, the point in place of its
           centroid). No move costs more than MAX; with F, only the F*t points of a donor nearest
           (dist) to a receiver are candidates; with ROUNDS, the matching runs as that many rounds
           of proposals (`match_rounds`, the form a GPU would run) instead of the greedy. The
           selection then runs with A's query centroids unchanged (keep: each cluster keeps A's
           mask, moved points take their new cluster's) or recomputed as the means of the new
           clusters (recomp: select_blocks runs again).
  C        A's clusters, with the tails packed into shared 64-row slabs (next fit in the greedy
           cosine chain order of the query centroids, as order_clusters orders them), each slab
           computed over the union of its members' kept keys with a per-row mask (its own item of
           64 rows for kv_reads). Quality is A's.
  A:seedN  A with another k-means seed for Q: the run-to-run noise of A's quality, for scale.
  A:pX     A selected at top-p X instead; A:eqwork at the top-p (bisected) whose computed pairs
           match those of B:<--match-work>:keep: what the same saving costs when it is taken from
           the selection instead of the padding.

Reported per head and variant: the padding share of computed rows (rows computed but discarded /
rows computed) and of computed pairs (wasted pairs / computed pairs; a computed row of a cluster
costs its kept keys; a slab row of C costs the union's keys), the density (kept video pairs /
Nq*Nk), the computed pairs relative to A's (the kernel's work: density / (1 - padding share)),
the kernel's K/V reads relative to A's (a cluster is ceil(n / 128) two-warpgroup items, each reading
the cluster's kept keys: the DRAM-bound side of the sparse path), points moved (% of video queries),
and quality against dense attention in fp32:
recall (softmax mass of the kept keys, averaged over query rows) and the relative L2 error of the
output (Frobenius over the head's rows). Quality is estimated on `--rows` uniformly sampled video
query rows for A; a variant V differs from A only on the rows whose kept key set changed, so its
value is A's plus the share of rows in a stratum times the mean change on a uniform sample of it,
over two strata: rows that some B variant moves (`--changed-rows` sampled) and rows that some B
variant changes without moving them (recomputed masks; half as many sampled). Far less noisy than
a second uniform sample, and exact on the sampled rows. The A:* variants are compared with A on the
uniform sample, row by row. Each Δ carries its sampling standard error (d_recall_se, d_rel_l2_se;
the report's ± combines them over heads); k-means noise is not in it (that is what A:seedN shows). HunyuanVideo's prompt keys count as kept
for every video query (the text rule); text query rows are two clusters of 64 and 192 rows, whole
blocks, and are left out.

What is the project's and what is re-implemented here: kmeans_init's seeded sample is re-implemented
(head h draws id = h, as in a [1, S, H, D] call; `--check` compares it with the op's on every head);
the Lloyd iterations run here in the matrix form ||c||^2 - 2 x.c (fp32, ties to the lower index,
empty clusters keep their centroid), the same algorithm as the op and about 3x faster on this CPU,
but not bit-equal at full size: the op sums squared differences, so a near-tie can go the other way
and the trajectory then parts (equal on `tiny` after 20 iterations; 99.0% of the labels equal at
Wan 1.3B head 0 after 50). A is therefore SVG2's algorithm, not the op's exact labels; the A:seedN
variants show how much such a different draw moves the numbers. select_blocks is re-implemented from
its contract (include/sapattn/ops.hpp). `--check DIR` compares the initial samples with the op's and
the selection's per-head density with sapattn.svg2_attention's on a small workload (0 warm
iterations, so the op selects on the given centroids).

    build/sapattn gen --preset wan-14b-720p --seed 1 --out /tmp/qpad/wan-14b-720p   # target sapattn_cli
    python tools/studies/query_padding.py --workload /tmp/qpad/wan-14b-720p --heads 0,1,2 \
        --noise-seeds 7,8 --rows 4096 --cache /tmp/qpad/cache --out out/qpad/wan-14b-720p.jsonl
    python tools/studies/query_padding.py --report out/qpad/*.jsonl
    python tools/studies/query_padding.py --check /tmp/qpad/tiny
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from size_rounding import BLOCK, distance_cost, mass_cost, round_clusters

KEY_SEED_XOR = 0x5BD1E9955BD1E995  # key_sample_seed() in include/sapattn/config.hpp


# ------------------------------------------------------------------------------------------------
# Workload and k-means


def load_workload(path: Path):
    from safetensors import safe_open
    meta = json.loads((path / "workload.json").read_text())
    assert meta["layout"] == "bhsd", meta["layout"]
    return meta, safe_open(str(path / "workload.safetensors"), "pt")


def head_tensor(f, name: str, h: int) -> torch.Tensor:
    return f.get_slice(name)[0:1, h:h + 1][0, 0].float().contiguous()  # [S, D] f32


def splitmix64(z):
    """src/cpu/kmeans.cpp's splitmix64 on a uint64 numpy array (wrapping arithmetic)."""
    import numpy as np
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_init(x: torch.Tensor, clusters: int, seed: int, head: int) -> torch.Tensor:
    """kmeans_init's seeded sample of head `head` of batch item 0 (ops.hpp): point i gets the key
    splitmix64(seed ^ splitmix64(head * 2^32 + i)), the C smallest keys (ties by index) become
    centroids 0..C-1 in ascending key order, centroid c takes point c mod N when C > N. `--check`
    compares it with the op's on every head of a workload."""
    import numpy as np
    n = x.shape[0]
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint64)
        key = splitmix64(np.uint64(seed & (2**64 - 1)) ^ splitmix64((np.uint64(head) << np.uint64(32)) + i))
    order = np.argsort(key, kind="stable")[:min(clusters, n)]
    ids = torch.from_numpy(order.astype(np.int64))
    return x[ids[torch.arange(clusters) % n]].clone()


def assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """argmin_c ||x - c||^2 (ties to the lower index, as torch.argmin returns the first minimum)."""
    c2 = (c * c).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = torch.addmm(c2[None], x[s:s + chunk], c.T, alpha=-2.0).argmin(1)
    return out


def lloyd(x: torch.Tensor, c: torch.Tensor, iters: int):
    """`iters` assign+update steps; returns (labels of the last assignment, sizes, centroids after
    the last update): the state select_blocks and the permutation see."""
    for _ in range(iters):
        labels = assign(x, c)
        sizes, c = means(x, labels, c)
    return labels, sizes, c


def means(x: torch.Tensor, labels: torch.Tensor, c_prev: torch.Tensor):
    """kmeans_update: sizes, and every non-empty centroid the (fp64-summed) mean of its points; an
    empty cluster keeps its previous centroid."""
    sizes = torch.bincount(labels, minlength=c_prev.shape[0])
    sums = torch.zeros(c_prev.shape, dtype=torch.float64).index_add_(0, labels, x.double())
    c = c_prev.clone()
    nonempty = sizes > 0
    c[nonempty] = (sums[nonempty] / sizes[nonempty, None]).float()
    return sizes, c


# ------------------------------------------------------------------------------------------------
# Selection (select_blocks' contract)


def select_blocks(cq: torch.Tensor, ck: torch.Tensor, k_sizes: torch.Tensor, scale: float, top_p: float,
                  min_kept: int) -> torch.Tensor:
    """mask [Cq, Ck] bool: per query-cluster row the size-weighted centroid softmax, ranked
    descending (ties to the lower index), the shortest prefix whose fp32 running sum reaches top_p
    (the crossing cluster kept), at least min_kept."""
    s = (cq @ ck.T) * scale
    nonempty = k_sizes > 0
    m = s.masked_fill(~nonempty[None], -math.inf).max(1, keepdim=True).values
    e = torch.exp((s - m).double()).float()
    w = torch.where(nonempty[None], k_sizes[None].float() * e, torch.zeros_like(e))
    w = w / w.sum(1, keepdim=True)
    order = torch.sort(w, dim=1, descending=True, stable=True).indices
    run = torch.cumsum(torch.gather(w, 1, order), dim=1)  # fp32, sequential
    reach = run >= top_p
    kept = torch.where(reach.any(1), reach.float().argmax(1) + 1, torch.full((w.shape[0],), w.shape[1]))
    kept = kept.clamp(min=min(min_kept, w.shape[1]))
    ranks = torch.arange(w.shape[1])[None] < kept[:, None]
    mask = torch.zeros_like(ranks)
    mask.scatter_(1, order, ranks)
    return mask


# ------------------------------------------------------------------------------------------------
# Layout statistics


def chain_order(c: torch.Tensor, sizes: torch.Tensor) -> list:
    """order_clusters' greedy nearest-neighbour chain by cosine similarity (empty clusters last)."""
    nonempty = torch.nonzero(sizes > 0).flatten().tolist()
    if not nonempty:
        return list(range(c.shape[0]))
    u = c / c.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = u @ u.T
    left = set(nonempty)
    cur = nonempty[0]
    order = [cur]
    left.remove(cur)
    avail = torch.zeros(c.shape[0], dtype=torch.bool)
    avail[list(left)] = True
    while left:
        row = sim[cur].masked_fill(~avail, -math.inf)
        cur = int(row.argmax())  # first maximum: ties to the lower index
        order.append(cur)
        left.remove(cur)
        avail[cur] = False
    return order + [i for i in range(c.shape[0]) if sizes[i] == 0]


ITEM = 2 * BLOCK  # rows per work item of the Hopper kernel (two warpgroups); an item reads its kept K/V once


def layout_stats(q_sizes: torch.Tensor, k_sizes: torch.Tensor, mask: torch.Tensor) -> dict:
    """Padding shares of the per-cluster 64-row blocks, density, and the kernel's K/V reads: a
    cluster of n rows is ceil(n / 128) items, each reading the cluster's kept keys (kv_reads, in the
    units of density: kept keys read x 128 / (Nq Nk), equal to density without padding); one_wg_items
    is the share of items with at most 64 rows (one warpgroup busy, the other idle)."""
    kk = (mask.double() * k_sizes.double()[None]).sum(1)  # kept keys per query cluster
    n = q_sizes.double()
    comp = torch.ceil(n / BLOCK) * BLOCK
    items = torch.ceil(n / ITEM)
    last = n - (items - 1) * ITEM  # rows of a cluster's last item
    pairs_all = float(n.sum()) * float(k_sizes.sum())
    return {
        "pad_rows": float((comp - n).sum() / comp.sum()),
        "pad_pairs": float(((comp - n) * kk).sum() / (comp * kk).sum()),
        "density": float((n * kk).sum() / pairs_all),
        "full_blocks_share": float((n % BLOCK == 0).double().mean()),
        "kv_reads": float((items * kk).sum()) * ITEM / pairs_all,
        "one_wg_items": float(((n > 0) & (last <= BLOCK)).double().sum() / items.sum()),
    }


def tail_packing_stats(q_sizes, k_sizes, mask, cq) -> dict:
    """C: full blocks per cluster; tails packed next-fit in chain order into 64-row slabs computed
    over the union of their members' kept keys."""
    order = chain_order(cq, q_sizes)
    ks = k_sizes.double()
    comp_rows = comp_pairs = useful_pairs = reads = 0.0
    slabs = members = items = 0
    cur_rows, cur_union, cur_members = 0, None, 0

    def close():
        nonlocal comp_rows, comp_pairs, slabs, members, reads
        if cur_members:
            comp_rows += BLOCK
            comp_pairs += BLOCK * float(ks[cur_union].sum())
            reads += float(ks[cur_union].sum())  # a slab: one 64-row item over the union
            slabs += 1
            members += cur_members

    for a in order:
        n = int(q_sizes[a])
        if n == 0:
            continue
        kk = float(ks[mask[a]].sum())
        full = n // BLOCK
        tail = n - full * BLOCK
        comp_rows += full * BLOCK
        comp_pairs += full * BLOCK * kk
        useful_pairs += n * kk
        reads += (full + 1) // 2 * kk  # full blocks in 128-row items (the last one may be 64 rows)
        items += (full + 1) // 2
        if tail == 0:
            continue
        if cur_rows + tail > BLOCK:
            close()
            cur_rows, cur_union, cur_members = 0, None, 0
        cur_rows += tail
        cur_union = mask[a].clone() if cur_union is None else (cur_union | mask[a])
        cur_members += 1
    close()
    n_total = float(q_sizes.sum())
    return {"pad_rows": (comp_rows - n_total) / comp_rows, "pad_pairs": (comp_pairs - useful_pairs) / comp_pairs,
            "kv_reads": reads * ITEM / (n_total * float(ks.sum())), "slabs": slabs,
            "tails_per_slab": members / max(slabs, 1), "items": items + slabs}


# ------------------------------------------------------------------------------------------------
# Quality


def kept_mass_metrics(q, k, v, group, groups, scale, rows, keeps, chunk=128):
    """Dense fp32 attention of the query rows `rows`, summed per key group (the video key clusters,
    then the text groups): mass [r, G] and probability-weighted values PV [r, G, D]. A variant that
    keeps groups m [r, G] has recall sum_g m mass and output sum_g m PV / recall, so every variant
    costs r*G*D, not another pass over the keys. keeps: name -> function(row ids) -> m [r, G] bool.
    Returns name -> (recall [R], squared output error [R]) and the dense outputs' squared norms [R]."""
    order = torch.argsort(group, stable=True)
    gs = group[order]
    bounds = torch.searchsorted(gs, torch.arange(groups + 1)).tolist()
    ks, vs = k[order], v[order]
    R = len(rows)
    res = {name: (torch.empty(R, dtype=torch.float64), torch.empty(R, dtype=torch.float64)) for name in keeps}
    ref2 = torch.empty(R, dtype=torch.float64)
    for s in range(0, R, chunk):
        ids = rows[s:s + chunk]
        p = torch.softmax((q[ids] @ ks.T) * scale, dim=1)  # [r, Sk], keys in group order
        mass = torch.zeros(len(ids), groups).index_add_(1, gs, p)
        pv = torch.zeros(len(ids), groups, v.shape[1])
        for g in range(groups):
            lo, hi = bounds[g], bounds[g + 1]
            if hi > lo:
                pv[:, g] = p[:, lo:hi] @ vs[lo:hi]
        out = pv.sum(1)
        ref2[s:s + len(ids)] = (out.double() ** 2).sum(1)
        for name, keep_of in keeps.items():
            kf = keep_of(ids).float()
            recall = (kf * mass).sum(1)
            o = torch.einsum("rg,rgd->rd", kf, pv) / recall.clamp_min(1e-30)[:, None]
            res[name][0][s:s + len(ids)] = recall.double()
            res[name][1][s:s + len(ids)] = ((o - out).double() ** 2).sum(1)
    return res, ref2


# ------------------------------------------------------------------------------------------------
# One head


PRESET_CLUSTERS = {  # (Cq, Ck) of the official SVG2 scripts
    "wan-1.3b-480p": (200, 1000),
    "wan-14b-720p": (300, 1000),
    "hunyuan-720p": (400, 1000),
}


def run_head(meta, f, h, args, cache: Path | None):
    t0 = time.time()
    S = meta["shape"][2]
    D = meta["shape"][3]
    text = meta.get("text_tokens", 0)
    prompt = meta.get("prompt_length", 0)
    N = S - text
    cq_n, ck_n = PRESET_CLUSTERS.get(meta["preset"], (min(300, max(1, round(N / 252))),
                                                       min(1000, max(1, round(N / 75.6)))))
    cq_n, ck_n = args.q_clusters or cq_n, args.k_clusters or ck_n
    scale = 1.0 / math.sqrt(D)
    q, k, v = (head_tensor(f, name, h) for name in ("q", "k", "v"))
    qv, kv = q[:N], k[:N]

    # "ph": the per-head sample (id = h), as kmeans_init draws it for head h of a [1, S, H, D] call.
    key = f"{meta['preset']}-s{meta['seed']}-h{h}-{cq_n}-{ck_n}-{args.q_iters}-{args.k_iters}-{args.seed}-ph"
    cached = cache / f"{key}.pt" if cache else None
    st = torch.load(cached) if cached and cached.exists() else {}
    if "ql" not in st:
        ql, qs, qc = lloyd(qv, sample_init(qv, cq_n, args.seed, h), args.q_iters)
        kl, ks, kc = lloyd(kv, sample_init(kv, ck_n, args.seed ^ KEY_SEED_XOR, h), args.k_iters)
        st.update({"ql": ql, "qs": qs, "qc": qc, "kl": kl, "ks": ks, "kc": kc})
    for ns_ in args.noise_seeds:
        if f"noise{ns_}" not in st:
            st[f"noise{ns_}"] = lloyd(qv, sample_init(qv, cq_n, ns_, h), args.q_iters)
    if cached:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(st, cached)
    t_kmeans = time.time() - t0
    kl, ks, kc = st["kl"], st["ks"], st["kc"]
    min_kept = int(math.floor(args.min_kc_ratio * ck_n))

    # Variants: name -> (query labels [N], mask [Cq, Ck], query sizes, moved [N] or None)
    variants = {}
    mask_a = select_blocks(st["qc"], kc, ks, scale, args.top_p, min_kept)
    variants["A"] = (st["ql"], mask_a, st["qs"], None)
    for ns_ in args.noise_seeds:
        nl, nsz, nc = st[f"noise{ns_}"]
        variants[f"A:seed{ns_}"] = (nl, select_blocks(nc, kc, ks, scale, args.top_p, min_kept), nsz, None)
    for tp in args.top_p_variants:  # A at a lower top-p: what the same saving costs without rounding
        variants[f"A:p{tp:g}"] = (st["ql"], select_blocks(st["qc"], kc, ks, scale, tp, min_kept), st["qs"], None)
    costs = {"dist": distance_cost(qv, st["qc"], st["ql"]),
             "mass": mass_cost(qv, st["ql"], mask_a, kc, ks, scale)}
    t_round = {}
    for spec in args.b_variants:  # COST:SLACK[:MAX_COST[:PREFILTER[:ROUNDS]]]
        parts = spec.split(":")
        cost_name, slack = parts[0], int(parts[1])
        max_cost = float(parts[2]) if len(parts) > 2 else math.inf
        prefilter = (costs["dist"], int(parts[3])) if len(parts) > 3 and int(parts[3]) > 0 else None
        rounds = int(parts[4]) if len(parts) > 4 else 0
        t1 = time.time()
        labels_b, moved = round_clusters(st["ql"], cq_n, costs[cost_name], slack, max_cost, prefilter, rounds)
        t_round[spec] = time.time() - t1
        sizes_b, qc_b = means(qv, labels_b, st["qc"])
        variants[f"B:{spec}:keep"] = (labels_b, mask_a, sizes_b, moved)
        variants[f"B:{spec}:recomp"] = (labels_b, select_blocks(qc_b, kc, ks, scale, args.top_p, min_kept), sizes_b,
                                        moved)

    # A:eqwork: A at the top-p whose computed pairs (density / (1 - padding share)) come closest to
    # those of B:{match_work}:keep: the quality the same saving costs when it comes from the selection.
    eq_top_p = None
    if args.match_work and f"B:{args.match_work}:keep" in variants:
        def work(v):
            st_ = layout_stats(v[2], ks, v[1])
            return st_["density"] / (1 - st_["pad_pairs"])
        target = work(variants[f"B:{args.match_work}:keep"])
        lo, hi = 0.0, args.top_p
        best_tp = None
        for _ in range(30):
            mid = (lo + hi) / 2
            w_mid = work((st["ql"], select_blocks(st["qc"], kc, ks, scale, mid, min_kept), st["qs"]))
            if best_tp is None or abs(w_mid - target) < best_tp[1]:
                best_tp = (mid, abs(w_mid - target))
            lo, hi = (lo, mid) if w_mid > target else (mid, hi)
        eq_top_p = best_tp[0]
        variants["A:eqwork"] = (st["ql"], select_blocks(st["qc"], kc, ks, scale, eq_top_p, min_kept), st["qs"], None)

    # Key groups: the Ck video key clusters, then the prompt (kept by every video query: the text
    # rule) and the text padding (never kept by video queries).
    group = torch.cat([kl, torch.full((prompt,), ck_n), torch.full((S - N - prompt,), ck_n + 1)])
    groups = ck_n + 2

    def keep_fn(name):
        lab, m = variants[name][0], variants[name][1]

        def keep(ids):
            out = torch.zeros(len(ids), groups, dtype=torch.bool)
            out[:, :ck_n] = m[lab[ids]]
            out[:, ck_n] = True
            return out
        return keep

    # Samples: U uniform over the video queries (every variant's value on its own); Z1 the rows some
    # B variant moves, Z2 the rows some B variant changes (a recomputed mask) without moving them.
    gen = torch.Generator().manual_seed(1000 + h)
    uniform = torch.randperm(N, generator=gen)[:args.rows]
    moved_any = torch.zeros(N, dtype=torch.bool)
    changed_any = torch.zeros(N, dtype=torch.bool)
    base_rows = mask_a[st["ql"]]
    changed = {}
    for name, (lab, m, _sizes, moved) in variants.items():
        if moved is not None:
            moved_any |= moved
            changed[name] = (m[lab] != base_rows).any(1)
            changed_any |= changed[name]
    del base_rows
    strata = []
    for members, size in ((moved_any, args.changed_rows), (changed_any & ~moved_any, args.changed_rows // 2)):
        ids = torch.nonzero(members).flatten()
        strata.append((len(ids), ids[torch.randperm(len(ids), generator=gen)[:size]]))
    rows_all = torch.cat([uniform] + [ids for _, ids in strata])
    t2 = time.time()
    evals, ref2_all = kept_mass_metrics(q, k, v, group, groups, scale, rows_all, {n: keep_fn(n) for n in variants})
    t_dense = time.time() - t2
    span = {"U": slice(0, len(uniform))}
    pos = len(uniform)
    for i, (_, ids) in enumerate(strata):
        span[f"Z{i + 1}"] = slice(pos, pos + len(ids))
        pos += len(ids)
    ref2 = ref2_all[span["U"]]

    def metric(name, part):
        return evals[name][0][span[part]], evals[name][1][span[part]]

    rec_a, err_a = metric("A", "U")
    mean_ref2 = float(ref2.mean())
    out = {"preset": meta["preset"], "seed": meta["seed"], "head": h, "kind": meta["head_kinds"][h], "N": N,
           "Cq": cq_n, "Ck": ck_n, "q_iters": args.q_iters, "k_iters": args.k_iters, "top_p": args.top_p,
           "rows": len(uniform), "strata": [[n, len(ids)] for n, ids in strata],
           "time_kmeans_s": round(t_kmeans, 1), "time_dense_rows_s": round(t_dense, 1), "variants": {}}
    for name, (lab, m, sizes, moved) in variants.items():
        row = layout_stats(sizes, ks, m)
        row["moved"] = float(moved.double().mean()) if moved is not None else 0.0
        rec_u, err_u = metric(name, "U")
        row["recall_uniform"] = float(rec_u.mean())
        # Standard errors of the differences to A (sampling only, rows paired): recall in points of
        # recall, rel L2 as a share of A's (d rel_l2 / rel_l2 = d err2 / (2 err2) to first order).
        if moved is None:
            row["recall"] = float(rec_u.mean())
            row["rel_l2"] = math.sqrt(float(err_u.mean()) / mean_ref2)
            R = len(rec_u)
            row["d_recall_se"] = float((rec_u - rec_a).std()) / math.sqrt(R) if R > 1 else 0.0
            row["d_rel_l2_se"] = (float((err_u - err_a).std()) / math.sqrt(R) / (2 * float(err_a.mean()))
                                  if R > 1 else 0.0)
        else:
            row["round_s"] = round(t_round[name[2:name.rindex(":")]], 2)
            row["changed_rows"] = float(changed[name].double().mean())
            d_rec = d_err2 = var_rec = var_err2 = 0.0
            for i, (n_members, ids) in enumerate(strata):
                if len(ids) == 0:
                    continue
                ra, ea = metric("A", f"Z{i + 1}")
                rv, ev = metric(name, f"Z{i + 1}")
                w = n_members / N
                d_rec += w * float((rv - ra).mean())
                d_err2 += w * float((ev - ea).mean())
                if len(ids) > 1:  # sampled without replacement: the finite population correction
                    fpc = 1 - len(ids) / n_members
                    var_rec += w * w * float((rv - ra).var()) / len(ids) * fpc
                    var_err2 += w * w * float((ev - ea).var()) / len(ids) * fpc
                if i == 0:
                    mv = moved[ids]
                    row["moved_rows_recall_A"] = float(ra[mv].mean()) if mv.any() else None
                    row["moved_rows_recall"] = float(rv[mv].mean()) if mv.any() else None
            row["d_recall_se"] = math.sqrt(var_rec)
            row["d_rel_l2_se"] = math.sqrt(var_err2) / (2 * float(err_a.mean()))
            row["recall"] = float(rec_a.mean()) + d_rec
            row["rel_l2"] = math.sqrt(max(0.0, float(err_a.mean()) + d_err2) / mean_ref2)
        if name == "A:eqwork":
            row["top_p"] = eq_top_p
        out["variants"][name] = row
    out["variants"]["C"] = {**tail_packing_stats(st["qs"], ks, mask_a, st["qc"]),
                            "density": out["variants"]["A"]["density"], "recall": out["variants"]["A"]["recall"],
                            "rel_l2": out["variants"]["A"]["rel_l2"], "moved": 0.0}
    out["time_total_s"] = round(time.time() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------------
# Report


def report(paths, only=None):
    """The table over heads, per workload and variant (those of `only`, in its order, if given)."""
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    presets = []
    for r in rows:
        if r["preset"] not in presets:
            presets.append(r["preset"])
    names = []
    for r in rows:
        for n in r["variants"]:
            if n not in names:
                names.append(n)
    if only:
        names = [n for n in only if n in names]
    # ± is the sampling standard error of the mean Δ over heads (rows paired; k-means noise is not
    # in it: compare with the A:seedN rows for that).
    print("| workload (heads) | variant | pad rows | pad pairs | density | computed pairs vs A | K/V reads vs A | moved "
          "| recall mean (worst) | Δrecall pp mean ± se (worst) | rel L2 mean (worst) "
          "| ΔL2 rel. mean ± se (worst) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        rs = [r for r in rows if r["preset"] == preset]
        heads = ",".join(f"{r['head']}{r['kind'][0].upper()}" for r in rs)
        for n in names:
            vs = [(r["variants"][n], r["variants"]["A"]) for r in rs if n in r["variants"]]
            if not vs:
                continue
            mean = lambda key: sum(v[key] for v, _ in vs) / len(vs)  # noqa: E731
            rec = [v["recall"] for v, _ in vs]
            l2 = [v["rel_l2"] for v, _ in vs]
            drec = [100 * (v["recall"] - a["recall"]) for v, a in vs]
            dl2 = [v["rel_l2"] / a["rel_l2"] - 1 for v, a in vs]
            worst_d = min(drec)
            # Computed pairs (kept / (1 - wasted share)) relative to A's: the kernel's work.
            work = sum(v["density"] / (1 - v["pad_pairs"]) / (a["density"] / (1 - a["pad_pairs"])) for v, a in vs)
            work /= len(vs)
            kv = sum(v["kv_reads"] / a["kv_reads"] for v, a in vs) / len(vs) if all("kv_reads" in v for v, _ in vs) \
                else float("nan")
            worst_l2 = max(dl2)
            se_rec = 100 * math.sqrt(sum(v.get("d_recall_se", 0.0) ** 2 for v, _ in vs)) / len(vs)
            se_l2 = 100 * math.sqrt(sum(v.get("d_rel_l2_se", 0.0) ** 2 for v, _ in vs)) / len(vs)
            print(f"| {preset} ({heads}) | {n} | {100 * mean('pad_rows'):.1f}% | {100 * mean('pad_pairs'):.1f}% "
                  f"| {mean('density'):.4f} | {work:.3f} | {kv:.3f} | {100 * mean('moved'):.2f}% "
                  f"| {sum(rec) / len(rec):.4f} ({min(rec):.4f}) "
                  f"| {sum(drec) / len(drec):+.3f} ± {se_rec:.3f} ({worst_d:+.3f}) "
                  f"| {sum(l2) / len(l2):.4f} ({max(l2):.4f}) "
                  f"| {100 * sum(dl2) / len(dl2):+.2f}% ± {se_l2:.2f}% ({100 * worst_l2:+.2f}%) |")


# ------------------------------------------------------------------------------------------------
# Check against the project's op


def check(path: Path):
    """select_blocks re-implemented here vs sapattn.svg2_attention's density, per head."""
    import sapattn
    meta, f = load_workload(path)
    B, H, S, D = meta["shape"]
    N = S - meta.get("text_tokens", 0)
    cfg = sapattn.SVG2Config(kmeans_iters_step=0)
    cq_n, ck_n = cfg.cluster_counts(N)
    state = sapattn.BranchState()
    q = f.get_tensor("q").transpose(1, 2).contiguous()  # [B,S,H,D]
    k = f.get_tensor("k").transpose(1, 2).contiguous()
    v = f.get_tensor("v").transpose(1, 2).contiguous()
    state.prepare(q, cfg, meta.get("text_tokens", 0))
    ok = True
    # The per-head initial sample vs the op's (all heads in one call, so that id = h).
    for name, x, C, seed in (("q", q, cq_n, 0), ("k", k, ck_n, KEY_SEED_XOR)):
        theirs = torch.empty(1, H, C, D)
        torch.ops.sapattn.kmeans(x[:, :N].float().contiguous(), theirs, True, 0, seed)
        same = all(torch.equal(sample_init(x[0, :N, h].float(), C, seed, h), theirs[0, h]) for h in range(H))
        print(f"initial sample of {name} ({C} clusters): {'equal to' if same else 'DIFFERS from'} the op's on every head")
        ok = ok and same
    mine = []
    scale = 1.0 / math.sqrt(D)
    for h in range(H):
        qh, kh = q[0, :N, h].float(), k[0, :N, h].float()
        _, _, qc = lloyd(qh, sample_init(qh, cq_n, 0, h), 5)
        _, _, kc = lloyd(kh, sample_init(kh, ck_n, KEY_SEED_XOR, h), 5)
        state.q_centroids[0, h], state.k_centroids[0, h] = qc, kc
        # With 0 iterations the op assigns to the given centroids and selects on them.
        ql, kl = assign(qh, qc), assign(kh, kc)
        qs, ks = torch.bincount(ql, minlength=cq_n), torch.bincount(kl, minlength=ck_n)
        m = select_blocks(qc, kc, ks, scale, cfg.top_p, int(cfg.min_kc_ratio * ck_n))
        if S > N:  # the op's density counts the whole layout: apply_text_rule's two text clusters
            prompt = meta.get("prompt_length", 0)
            text_sizes = torch.tensor([prompt, S - N - prompt])
            qs, ks = torch.cat([qs, text_sizes]), torch.cat([ks, text_sizes])
            full = torch.zeros(cq_n + 2, ck_n + 2, dtype=torch.bool)
            full[:cq_n, :ck_n] = m
            full[:cq_n, ck_n] = True           # video rows keep the prompt
            full[cq_n, :ck_n + 1] = True       # the prompt row keeps every video key and the prompt
            full[cq_n + 1, ck_n + 1] = True    # padding keeps padding
            m = full
        mine.append(layout_stats(qs, ks, m)["density"])
    _, _, density = sapattn.svg2_attention(q, k, v, cfg, state, text_tokens=meta.get("text_tokens", 0),
                                           prompt_length=meta.get("prompt_length", 0))
    for h in range(H):
        theirs = float(density[0, h])
        print(f"head {h}: density here {mine[h]:.6f}, svg2_attention {theirs:.6f}")
        ok = ok and abs(mine[h] - theirs) <= 1e-4 * max(theirs, 1e-6) + 1e-6
    print("check:", "ok" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", type=Path, help="folder written by `sapattn gen`")
    p.add_argument("--heads", default="", help="comma list; default the first head of each kind")
    p.add_argument("--q-clusters", type=int, default=0, help="default: one per 252 video tokens, at most 300")
    p.add_argument("--k-clusters", type=int, default=0, help="default: one per 75.6 video tokens, at most 1000")
    p.add_argument("--q-iters", type=int, default=50)
    p.add_argument("--k-iters", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-p-variants", default="", help="comma list: also run A at these top-p (A:pX)")
    p.add_argument("--match-work", default="mass:16:0.1:4:8",
                   help="B variant (as in --b) whose computed pairs A:eqwork matches by lowering top-p")
    p.add_argument("--min-kc-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="SVG2Config.seed (keys use key_sample_seed of it)")
    p.add_argument("--noise-seeds", default="", help="comma list: also run A with these Q k-means seeds")
    p.add_argument("--b", dest="b_variants",
                   default="dist:0,dist:8,dist:16,mass:0,mass:8,mass:16,mass:8:0.1,mass:16:0.1,mass:16:0.1:4,"
                           "mass:16:0.1:4:8",
                   help="B variants COST:SLACK[:MAX_COST[:F]]; COST dist (increase of ||x - c||^2) or mass "
                        "(estimated attention mass lost), SLACK rows of padding a cluster may keep, MAX_COST the "
                        "dearest move, F: only the F*tail points of a donor nearest (dist) to a receiver are moved, "
                        "ROUNDS: match in that many rounds of proposals per phase instead of the greedy")
    p.add_argument("--rows", type=int, default=1024, help="uniformly sampled query rows per head")
    p.add_argument("--changed-rows", type=int, default=2048, help="sampled rows among those B changes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=None, help="folder for k-means results (reruns skip k-means)")
    p.add_argument("--out", type=Path, help="JSON lines, one per head (appended)")
    p.add_argument("--report", nargs="*", help="print the table of these JSON-lines files")
    p.add_argument("--only", default="", help="with --report: these variants only, in this order")
    p.add_argument("--check", type=Path, help="compare the selection with svg2_attention's on this workload")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import sapattn  # noqa: F401  loads torch.ops.sapattn
    if args.report:
        report(args.report, [n for n in args.only.split(",") if n] if args.only else None)
        return 0
    if args.check:
        return check(args.check)
    args.b_variants = [b for b in args.b_variants.split(",") if b]
    args.noise_seeds = [int(x) for x in args.noise_seeds.split(",") if x]
    args.top_p_variants = [float(x) for x in args.top_p_variants.split(",") if x]
    meta, f = load_workload(args.workload)
    kinds = meta["head_kinds"]
    heads = ([int(h) for h in args.heads.split(",")] if args.heads
             else [kinds.index(kd) for kd in dict.fromkeys(kinds)])
    for h in heads:
        r = run_head(meta, f, h, args, args.cache)
        line = json.dumps(r)
        print(line, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as fo:
                fo.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
