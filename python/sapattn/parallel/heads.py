"""Which rank attends which heads. Pure Python, deterministic: every rank computes the same
assignment from the same costs, so no assignment is ever communicated.

Each head is split into `replicas` work items (head, shard): shard j attends over the key clusters
with index % replicas == j, and the shards' outputs combine by LSE. replicas = 1 is plain Ulysses
(every head whole on one rank); replicas > 1 serves head counts that do not divide the ranks
(Wan 1.3B: 12 heads on 8 GPUs -> 2 shards each, 3 items per rank)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

Item = Tuple[int, int]  # (head, shard)


def replicas_for(heads: int, world: int) -> int:
    """The fewest shards per head that give every rank the same number of items."""
    return world // math.gcd(heads, world)


@dataclass(frozen=True)
class Assignment:
    heads: int
    world: int
    replicas: int
    items: Tuple[Tuple[Item, ...], ...]  # items[rank], in the order the rank lays them out

    def loads(self, costs: Sequence[float]) -> List[float]:
        return [sum(costs[h] / self.replicas for h, _ in rank_items) for rank_items in self.items]

    def imbalance(self, costs: Sequence[float]) -> float:
        """Slowest rank's load over the mean load (1.0 = perfect)."""
        loads = self.loads(costs)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    def check(self) -> None:
        """Every (head, shard) exactly once, and no rank holds two shards of one head."""
        seen = sorted(item for rank_items in self.items for item in rank_items)
        expected = [(h, j) for h in range(self.heads) for j in range(self.replicas)]
        if seen != expected:
            raise AssertionError(f"the assignment loses or duplicates work: {self.items}")
        for rank_items in self.items:
            heads = [h for h, _ in rank_items]
            if len(set(heads)) != len(heads):
                raise AssertionError(f"a rank holds two shards of one head: {rank_items}")


def balance(costs: Sequence[float], world: int, replicas: int = 1) -> Assignment:
    """Longest-processing-time-first: items by cost / replicas, heaviest first, each to the least
    loaded rank that does not hold that head yet (ties: the lower rank, then the lower head), with
    every rank capped at the mean item count so that the all-to-all volumes stay even.
    Items are laid out on a rank by (shard, head)."""
    heads = len(costs)
    if world < 1 or replicas < 1:
        raise ValueError(f"world and replicas must be >= 1, got {world}, {replicas}")
    if replicas > world:
        raise ValueError(f"{replicas} shards per head need at least as many ranks, got {world}")
    total = heads * replicas
    cap = -(-total // world)  # ceil
    order = sorted(((h, j) for h in range(heads) for j in range(replicas)),
                   key=lambda item: (-costs[item[0]], item[0], item[1]))
    loads = [0.0] * world
    placed: List[List[Item]] = [[] for _ in range(world)]
    for h, j in order:
        candidates = [r for r in range(world) if len(placed[r]) < cap and all(h != g for g, _ in placed[r])]
        if not candidates:  # the cap and the one-shard-per-rank rule cannot both hold: drop the cap
            candidates = [r for r in range(world) if all(h != g for g, _ in placed[r])]
        r = min(candidates, key=lambda c: (loads[c], c))
        placed[r].append((h, j))
        loads[r] += costs[h] / replicas
    assignment = Assignment(heads, world, replicas,
                            tuple(tuple(sorted(p, key=lambda item: (item[1], item[0]))) for p in placed))
    assignment.check()
    return assignment


def contiguous(heads: int, world: int, replicas: int = 1) -> Assignment:
    """The plain Ulysses split before any cost is known: items (head, shard) in shard-major order cut
    into equal runs, so rank r gets heads [r*H/P, (r+1)*H/P) when P divides H. A run never holds two
    shards of one head (it is at most H items long, since replicas <= world)."""
    if replicas > world:
        raise ValueError(f"{replicas} shards per head need at least as many ranks, got {world}")
    order = [(h, j) for j in range(replicas) for h in range(heads)]
    per_rank = len(order) // world
    if per_rank * world != len(order):
        raise ValueError(f"{heads} heads x {replicas} shards do not split evenly over {world} ranks "
                         f"(replicas_for gives a count that does)")
    assignment = Assignment(heads, world, replicas,
                            tuple(tuple(order[r * per_rank:(r + 1) * per_rank]) for r in range(world)))
    assignment.check()
    return assignment
