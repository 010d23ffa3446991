"""Size rounding of query clusters (variant B of query_padding.py): points move between query
clusters until every cluster's tail n mod 64 is 0 or within a slack of a whole 64-row block.

`round_clusters` is the greedy transportation the study measures (and the algorithm the op
`round_query_clusters` implements, include/sapattn/ops.hpp); `match_rounds` the same matching as
data-parallel proposal rounds; `distance_cost` and `mass_cost` the two move costs compared.
"""
from __future__ import annotations

import math

import torch

BLOCK = 64  # rows per warpgroup block of the Hopper kernel


def distance_cost(x: torch.Tensor, c: torch.Tensor, labels: torch.Tensor):
    """Move cost: the increase of ||x - c||^2 (what k-means itself would minimise)."""
    c2 = (c * c).sum(1)

    def cost(pts, targets):
        xp = x[pts]
        own = c2[labels[pts]] - 2 * (xp * c[labels[pts]]).sum(1)
        return c2[targets][None] - 2 * xp @ c[targets].T - own[:, None]  # [P, R]
    return cost


def mass_cost(x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, kc: torch.Tensor, k_sizes: torch.Tensor,
              scale: float):
    """Move cost: the point's estimated attention mass lost by taking the receiver's kept key
    clusters instead of its own: per point the size-weighted softmax over the key centroids (the
    selection's estimate, with the point in place of its query centroid), summed over each mask."""
    log_size = torch.where(k_sizes > 0, k_sizes.float().log(), torch.full(k_sizes.shape, -math.inf))
    m = mask.float()

    def cost(pts, targets):
        p = torch.softmax(x[pts] @ kc.T * scale + log_size[None], dim=1)  # [P, Ck]
        own = (p * m[labels[pts]]).sum(1)
        return own[:, None] - p @ m[targets].T  # [P, R]
    return cost


def round_clusters(labels: torch.Tensor, clusters: int, move_cost, slack: int, max_cost: float = math.inf,
                   prefilter=None, rounds: int = 0, candidates: int = 16):
    """Moves points between query clusters so that every tail t = n mod 64 is 0 or >= 64 - slack.

    Roles: a cluster with t = 0 or t >= 64 - slack is done (it may take up to 64 - t more, optional
    capacity); of the others, the k with the smallest tails are donors (they give all t points) and
    the rest receivers (they take 64 - t - slack .. 64 - t). k is the smallest count whose supply
    meets the receivers' minimum demand, unless one more donor costs fewer padding rows. Moves:
    every point of a donor ranks its `candidates` cheapest receivers by move_cost(points,
    receivers) [P, R]; the (point, receiver) pairs are taken in ascending cost while the donor has points
    left to give and the receiver room, first up to each receiver's minimum demand, then up to its
    capacity; donors still short then go to any receiver with room. No move costs more than
    max_cost: a donor that cannot give its whole tail within it takes its points back (a partial
    tail would still pad to 64), and its receivers may stay short. prefilter = (cost, F): only the
    F*t points of each donor that are cheapest by `cost` to their cheapest receiver are candidates
    (so that an expensive move_cost is computed for a few points only). rounds > 0 replaces the
    greedy (a sequential scan of the sorted moves) by that many rounds of proposals per phase
    (`match_rounds`, the form a GPU would run). Returns (new labels, moved mask)."""
    C = clusters
    n = torch.bincount(labels, minlength=C)
    t = n % BLOCK
    done = (t == 0) | (t >= BLOCK - slack)
    open_ids = torch.nonzero(~done).flatten()
    open_ids = open_ids[torch.sort(t[open_ids], stable=True).indices]  # ascending tail
    optional_cap = int((BLOCK - t[done & (t > 0)]).sum())
    best = None
    for k in range(len(open_ids) + 1):
        donors, recv = open_ids[:k], open_ids[k:]
        supply = int(t[donors].sum())
        dmin = int((BLOCK - slack - t[recv]).sum())
        dmax = int((BLOCK - t[recv]).sum()) + optional_cap
        # Padding rows the imbalance leaves: receivers short by the shortfall, or a donor that keeps
        # part of its tail (a partial block).
        excess = supply - dmax
        pad = dmin - supply if supply < dmin else ((-excess) % BLOCK if excess > 0 else 0)
        key = (pad, supply)
        if best is None or key < best[0]:
            best = (key, k)
    k = best[1]
    donors, recv = open_ids[:k], open_ids[k:]
    give = torch.zeros(C, dtype=torch.int64)
    give[donors] = t[donors]
    need = torch.zeros(C, dtype=torch.int64)
    cap = torch.zeros(C, dtype=torch.int64)
    need[recv] = BLOCK - slack - t[recv]
    cap[recv] = BLOCK - t[recv]
    opt = torch.nonzero(done & (t > 0)).flatten()
    cap[opt] = BLOCK - t[opt]
    targets = torch.nonzero(cap > 0).flatten()
    if len(donors) == 0 or len(targets) == 0:
        return labels.clone(), torch.zeros(labels.shape[0], dtype=torch.bool)
    is_donor = torch.zeros(C, dtype=torch.bool)
    is_donor[donors] = True
    pts = torch.nonzero(is_donor[labels]).flatten()
    if prefilter is not None:
        pre_cost, factor = prefilter
        best = pre_cost(pts, targets).min(1).values
        order = torch.sort(best, stable=True).indices
        order = order[torch.sort(labels[pts][order], stable=True).indices]  # by donor, then by cost
        lab_sorted = labels[pts][order]
        first = torch.searchsorted(lab_sorted, lab_sorted)  # index of the donor's first point
        rank = torch.arange(len(order)) - first
        pts = pts[order[rank < factor * t[lab_sorted]]]
    cost = move_cost(pts, targets)  # [P, R]
    cost = cost.masked_fill(cost > max_cost, math.inf)
    if rounds > 0:
        return match_rounds(labels, pts, targets, cost, t, give, need, cap, rounds, candidates)

    give_l, need_l, cap_l = give.tolist(), need.tolist(), cap.tolist()
    lab_l, moved_l = labels.tolist(), [False] * labels.shape[0]
    origin = {}

    def take(order_pts, order_tgt, up_to_need):
        for i, r in zip(order_pts.tolist(), order_tgt.tolist()):
            a = lab_l[i]
            if moved_l[i] or give_l[a] == 0 or (need_l[r] if up_to_need else cap_l[r]) == 0:
                continue
            origin[i] = a
            lab_l[i] = r
            moved_l[i] = True
            give_l[a] -= 1
            cap_l[r] -= 1
            need_l[r] = max(0, need_l[r] - 1)

    kk = min(candidates, len(targets))
    top_cost, top_idx = torch.topk(cost, kk, dim=1, largest=False)
    flat = torch.argsort(top_cost.flatten(), stable=True)
    cand_pts = pts[flat // kk]
    cand_tgt = targets[top_idx.flatten()[flat]]
    finite = torch.isfinite(top_cost.flatten()[flat])
    cand_pts, cand_tgt = cand_pts[finite], cand_tgt[finite]
    take(cand_pts, cand_tgt, True)   # phase 1: minimum demands
    take(cand_pts, cand_tgt, False)  # phase 2: up to capacity
    if sum(give_l) > 0:              # phase 3: donors still short, any receiver with room
        short = torch.tensor([not moved_l[i] and give_l[lab_l[i]] > 0 for i in pts.tolist()])
        sub = torch.nonzero(short).flatten()
        flat = torch.argsort(cost[sub].flatten(), stable=True)
        keep = torch.isfinite(cost[sub].flatten()[flat])
        flat = flat[keep]
        take(pts[sub[flat // len(targets)]], targets[flat % len(targets)], False)
    for i, a in origin.items():  # donors still short take their points back
        if give_l[a] > 0:
            lab_l[i] = a
            moved_l[i] = False
    return torch.tensor(lab_l), torch.tensor(moved_l)


def rank_within(groups: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Rank of each element among those of its group, by ascending key (ties by position)."""
    order = torch.sort(key, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    g = groups[order]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - torch.searchsorted(g, g)
    return rank


def match_rounds(labels, pts, targets, cost, t, give, need, cap, rounds, candidates):
    """round_clusters' matching as data-parallel rounds. Each donor offers its t cheapest points
    (by their cheapest receiver); in every round each offered, unplaced point proposes to its next
    candidate receiver that has room left, and each receiver accepts the cheapest proposals up to
    its room; a point with no such candidate is withdrawn and its donor offers its next point.
    Two phases as the greedy's: room = the minimum demand, then the capacity left. Donors short at
    the end take their points back."""
    P = len(pts)
    kk = min(candidates, cost.shape[1])
    cand_cost, cand_idx = torch.topk(cost, kk, dim=1, largest=False)  # [P, kk] ascending
    donor = labels[pts]
    placed = torch.zeros(P, dtype=torch.bool)
    dest = torch.full((P,), -1, dtype=torch.int64)
    received = torch.zeros(len(targets), dtype=torch.int64)
    need_t, cap_t = need[targets].clone(), cap[targets].clone()
    cols = torch.arange(kk)[None]
    for phase in ("need", "cap"):
        for _ in range(rounds):
            room = (need_t - received).clamp(min=0) if phase == "need" else cap_t - received
            # Each unplaced point's cheapest candidate that still has room (room is known to all at
            # the start of a round; a point with none is withdrawn).
            usable = torch.isfinite(cand_cost) & (room[cand_idx] > 0) & ~placed[:, None]
            has = usable.any(1)
            first = torch.where(usable, cols, kk).min(1).values.clamp(max=kk - 1)
            cur = torch.where(has, cand_cost[torch.arange(P), first], torch.full((P,), math.inf))
            # Offer per donor: its (t - placed) cheapest such points.
            left = give[donor] - torch.bincount(donor[placed], minlength=len(give))[donor]
            offered = has & (rank_within(donor, cur) < left)
            ids = torch.nonzero(offered).flatten()
            if len(ids) == 0:
                break
            r = cand_idx[ids, first[ids]]
            ok = rank_within(r, cur[ids]) < room[r]
            acc = ids[ok]
            placed[acc] = True
            dest[acc] = r[ok]
            received += torch.bincount(r[ok], minlength=len(targets))
    short = torch.bincount(donor[placed], minlength=len(give)) < give
    placed &= ~short[donor]
    new_labels = labels.clone()
    new_labels[pts[placed]] = targets[dest[placed]]
    moved = torch.zeros(labels.shape[0], dtype=torch.bool)
    moved[pts[placed]] = True
    return new_labels, moved
