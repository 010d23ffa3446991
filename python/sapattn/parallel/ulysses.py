"""Sequence-parallel SVG2 over torch.distributed (NCCL on GPUs, gloo on CPUs).

Each rank holds a contiguous shard of the sequence with every head, [B, S_rank, H, D], shards in
rank order. One all-to-all gives each rank the whole sequence of the heads it is assigned
(heads.py); it runs SVG2 on them locally - k-means, selection and the kernel are per head, so
nothing else changes and the token order is the one a single GPU sees - and a second all-to-all
returns the outputs to the ranks that own the tokens. A head split into shards (head counts that
do not divide the ranks) attends over a share of its kept key clusters on each of its ranks, and
the token owner combines the partial outputs by their LSE.

Head balancing: top-p gives heads different densities, and the slowest rank sets the step time.
Each call adds its heads' measured densities to a cost table on the device; rebalance() (at a
step's end, on every rank) reads the table once, and when the current assignment's slowest rank is
more than `threshold` over the mean, switches to the longest-processing-time assignment of the
measured costs. The k-means state moves with its heads. Assignments depend only on the costs, so
every rank computes the same one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..attention import BranchState, svg2_attention
from ..config import SVG2Config
from .heads import Assignment, balance, contiguous, replicas_for


class _Indices:
    """The index tensors of one assignment on one device, made once: indexing with Python lists
    would copy a new index tensor to the GPU at every call."""

    def __init__(self, assignment: Assignment, rank: int, device: torch.device) -> None:
        def index(values):
            return torch.tensor(values, dtype=torch.int64, device=device)

        mine = assignment.items[rank]
        self.heads_of = [index([h for h, _ in assignment.items[r]]) for r in range(assignment.world)]
        self.shards = sorted({j for _, j in mine})
        self.positions = {j: index([i for i, (_, s) in enumerate(mine) if s == j]) for j in self.shards}
        self.shard_heads = {j: index([h for h, s in mine if s == j]) for j in self.shards}
        # For combining shards: item i of rank r is (head, shard) -> flat slot shard * H + head.
        self.slots = [index([j * assignment.heads + h for h, j in assignment.items[r]]) for r in range(assignment.world)]


@dataclass
class _LayerShards:
    """The k-means state of one (layer, branch) on this rank: one BranchState per shard index,
    its centroid rows in the order of this rank's items of that shard."""

    states: Dict[int, BranchState] = field(default_factory=dict)


class SequenceParallelSVG2:
    """SVG2 attention of sequence shards. Every rank of `group` calls attention() for the same
    layers in the same order (collectives inside), with q, k, v of its own shard."""

    def __init__(self, config: SVG2Config, heads: int, group: Optional[dist.ProcessGroup] = None, *,
                 replicas: Optional[int] = None, balance_heads: bool = True, threshold: float = 1.05,
                 kmeans_cost: float = 0.05) -> None:
        self.config = config
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.heads = heads
        self.replicas = replicas if replicas is not None else replicas_for(heads, self.world)
        self.assignment: Assignment = contiguous(heads, self.world, self.replicas)
        self.balance_heads = balance_heads
        self.threshold = threshold
        self.kmeans_cost = kmeans_cost  # per-head cost of clustering, in units of a dense head's attention
        self._layers: Dict[Tuple[int, int], _LayerShards] = {}
        self._costs: Optional[torch.Tensor] = None  # [H] summed densities since the last rebalance
        self._seq_lens: Dict[Tuple[int, ...], List[int]] = {}
        self._index_cache = None
        self._calls = 0  # attention() calls since the last rebalance

    # -- communication ----------------------------------------------------------------------------
    def _sequence_lengths(self, q: torch.Tensor) -> List[int]:
        """Every rank's shard length, gathered once per input shape."""
        key = tuple(q.shape)
        if key not in self._seq_lens:
            mine = torch.tensor([q.shape[1]], dtype=torch.int64, device=q.device)
            every = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(every, mine, group=self.group)
            self._seq_lens[key] = [int(t.item()) for t in every]
        return self._seq_lens[key]

    def _all_to_all(self, send: List[torch.Tensor], recv_shapes: List[Tuple[int, ...]], dtype, device
                    ) -> List[torch.Tensor]:
        """send[r] goes to rank r; returns what each rank sent here, shaped recv_shapes[r]."""
        flat = torch.cat([t.reshape(-1) for t in send])
        sizes_out = [t.numel() for t in send]
        sizes_in = [int(torch.Size(s).numel()) for s in recv_shapes]
        out = torch.empty(sum(sizes_in), dtype=dtype, device=device)
        dist.all_to_all_single(out, flat, sizes_in, sizes_out, group=self.group)
        return [t.view(s) for t, s in zip(out.split(sizes_in), recv_shapes)]

    # -- the call ---------------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, branch: int = 0
                  ) -> torch.Tensor:
        """q, k, v: this rank's shard [B, S_rank, H, D]. Returns its output shard [B, S_rank, H, D]."""
        if q.dim() != 4 or q.shape[2] != self.heads:
            raise ValueError(f"sapattn: expected a shard [batch, seq, {self.heads} heads, head_dim], got {tuple(q.shape)}")
        batch, _, heads, dim = q.shape
        lens = self._sequence_lengths(q)
        starts = [sum(lens[:r]) for r in range(self.world)]
        counts = [len(r_items) for r_items in self.assignment.items]
        idx = self._indices(q.device)
        mine = counts[self.rank]
        self._calls += 1

        # 1. Sequence shards with all heads -> whole sequence of my heads: [3, B, S, h_me, D].
        qkv = torch.stack((q, k, v))
        send = [qkv.index_select(3, idx.heads_of[r]) for r in range(self.world)]
        parts = self._all_to_all(send, [(3, batch, lens[r], mine, dim) for r in range(self.world)], q.dtype, q.device)
        full = torch.cat(parts, dim=2)
        seq = full.shape[2]

        # 2. SVG2 on my items, one call per shard index.
        state = self._layers.setdefault((layer, branch), _LayerShards())
        sharded = self.replicas > 1
        out = torch.empty(batch, seq, mine, dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, mine, seq, dtype=torch.float32, device=q.device) if sharded else None
        for shard in idx.shards:
            pos = idx.positions[shard]
            sub = full.index_select(3, pos)
            # Each head samples its initial centroids as it would among all heads on one GPU.
            ids = (torch.arange(batch, device=q.device)[:, None] * heads + idx.shard_heads[shard]).to(torch.int32)
            o, l, density = svg2_attention(sub[0], sub[1], sub[2], self.config,
                                           state.states.setdefault(shard, BranchState()), return_lse=sharded,
                                           key_shard=(shard, self.replicas), sample_ids=ids)
            out.index_copy_(2, pos, o)
            if sharded:
                lse.index_copy_(1, pos, l)
            self._add_costs(idx.shard_heads[shard], density)

        # 3. My heads' outputs -> the owners of the tokens: from each rank r, [B, S_me, h_r, D].
        back = self._all_to_all([out[:, starts[r]:starts[r] + lens[r]] for r in range(self.world)],
                                [(batch, lens[self.rank], counts[r], dim) for r in range(self.world)], q.dtype,
                                q.device)
        if not sharded:
            result = torch.empty(batch, lens[self.rank], heads, dim, dtype=q.dtype, device=q.device)
            for r in range(self.world):
                result.index_copy_(2, idx.heads_of[r], back[r])
            return result

        # 4. Shards of a head combine by LSE: out = sum_j exp(lse_j - logsumexp_j lse_j) out_j.
        lse_back = self._all_to_all([lse[:, :, starts[r]:starts[r] + lens[r]] for r in range(self.world)],
                                    [(batch, counts[r], lens[self.rank]) for r in range(self.world)], torch.float32,
                                    q.device)
        slots = self.replicas * heads
        partial = torch.empty(batch, lens[self.rank], slots, dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(batch, slots, lens[self.rank], dtype=torch.float32, device=q.device)
        for r in range(self.world):
            partial.index_copy_(2, idx.slots[r], back[r].float())
            partial_lse.index_copy_(1, idx.slots[r], lse_back[r])
        partial = partial.view(batch, lens[self.rank], self.replicas, heads, dim)
        # A row that keeps no key in any shard has every lse = -inf: weight 0, output 0 (as on one GPU).
        weights = torch.softmax(partial_lse.view(batch, self.replicas, heads, -1), dim=1).nan_to_num(0.0)
        combined = (partial * weights.permute(0, 3, 1, 2)[..., None]).sum(dim=2)  # [B, S_me, H, D]
        return combined.to(q.dtype)

    def _indices(self, device: torch.device) -> _Indices:
        key = (self.assignment, device)
        if self._index_cache is None or self._index_cache[0] != key:
            self._index_cache = (key, _Indices(self.assignment, self.rank, device))
        return self._index_cache[1]

    def _add_costs(self, heads: torch.Tensor, density: torch.Tensor) -> None:
        if self._costs is None:
            self._costs = torch.zeros(self.heads, dtype=torch.float32, device=density.device)
        self._costs.index_add_(0, heads, density.mean(dim=0))

    # -- balancing --------------------------------------------------------------------------------
    def rebalance(self) -> bool:
        """At a step's end, on every rank: reassigns heads by the costs measured since the last
        call when that helps enough. Returns whether the assignment changed. One small all-reduce
        and one read to the host; moving heads all-reduces their centroids."""
        if not self.balance_heads or self._costs is None:
            return False
        totals = self._costs.clone()
        dist.all_reduce(totals, group=self.group)
        self._costs.zero_()
        calls, self._calls = max(1, self._calls), 0
        costs = [c / calls + self.kmeans_cost for c in totals.tolist()]
        current = self.assignment.imbalance(costs)
        candidate = balance(costs, self.world, self.replicas)
        if current <= self.threshold or candidate.imbalance(costs) >= current - 1e-3:
            return False
        self._move_state(candidate)
        self.assignment = candidate
        return True

    def _move_state(self, new: Assignment) -> None:
        """Gives every rank the centroids of its new items: each head's centroids are summed into a
        [B, H, C, D] table from the rank holding its shard 0 (every shard of a head holds the same
        centroids: the same keys and seed), then sliced."""
        old_mine = self.assignment.items[self.rank]
        new_mine = new.items[self.rank]
        for key, layer in self._layers.items():
            first = next(iter(layer.states.values()))
            if not first.initialized:
                continue
            tables = []
            for name in ("q_centroids", "k_centroids"):
                ref = getattr(first, name)
                table = torch.zeros(ref.shape[0], self.heads, *ref.shape[2:], dtype=ref.dtype, device=ref.device)
                for shard, st in layer.states.items():
                    rows = [h for h, j in old_mine if j == shard]
                    if shard == 0:
                        table[:, rows] = getattr(st, name)
                dist.all_reduce(table, group=self.group)
                tables.append(table)
            counters = (first.calls, first.warm_iters)
            layer.states = {}
            for shard in sorted({j for _, j in new_mine}):
                rows = [h for h, j in new_mine if j == shard]
                layer.states[shard] = BranchState(tables[0][:, rows].contiguous(), tables[1][:, rows].contiguous(),
                                                  *counters)
