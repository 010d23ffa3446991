"""SVG2 configuration: the method's knobs and the schedule that decides which calls are sparse.

Defaults are the official SVG2 Wan 2.1 T2V 720p script's:
300 query clusters and 1000 key clusters at its 75,600 tokens, top-p 0.9, min_kc_ratio 0.10, 2
k-means iterations at each sparse call after a layer's first, dense for the first 20% of the steps
and 3% of the layers. Shorter sequences get the same tokens per cluster, as the sapattn command's.
One default is sapattn's own: the first sparse call seeds its k-means by greedy k-means++ on 2C
sampled tokens and runs 14 iterations, where the official code samples C tokens and runs 50 (a lower
k-means objective for 3.5x less work, docs/cuda.md; kmeans_seeding="sample", kmeans_iters_init=50
restores the official start)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

# The official Wan 2.1 720p counts, 300 query and 1000 key clusters for 75,600 video tokens, as tokens
# per cluster: the default counts of a shorter sequence (tools/sapattn/common.cpp, config_from).
_TOKENS_PER_Q_CLUSTER = 252.0
_TOKENS_PER_K_CLUSTER = 75.6
_MAX_Q_CLUSTERS, _MAX_K_CLUSTERS = 300, 1000
# The methods with_method knows, as `sapattn eval --method` names them.
METHODS = ("sap", "ear", "ear-plus")
# Every other field is an argument of torch.ops.sapattn.svg2_attention of the same name, whose
# default is the C++ Config's (attention.py checks both at import). These stay on the host: the
# cluster counts become the centroids' shapes (BranchState.prepare), the rest is the schedule.
HOST_FIELDS = ("q_clusters", "k_clusters", "first_times_fp", "first_layers_fp", "kmeans_iters_warmup")
# Defaults unlike the C++ Config's, on purpose: check_finite reads its answer back to the host (a
# stream sync per call, refused under graph capture), so here it is off; the C++ Config checks.
DEFAULTS_UNLIKE_CPP = ("check_finite",)


@dataclasses.dataclass
class SVG2Config:
    # None: scale with the call's video tokens (cluster_counts); a number: that many, which must not
    # exceed the video tokens (a cluster needs at least one token).
    q_clusters: Optional[int] = None
    k_clusters: Optional[int] = None
    top_p: float = 0.9
    min_kc_ratio: float = 0.10
    # The first sparse call of a layer: "greedy_pp" seeds by greedy k-means++ on kmeans_sample_factor * C
    # sampled tokens (1 to 64), "sample" takes C sampled tokens; then kmeans_iters_init iterations.
    kmeans_seeding: str = "greedy_pp"
    kmeans_sample_factor: int = 2
    # > 0: a call's Lloyd iterations after its first two (first call) or first (later calls) assign each
    # token among its previous cluster's kmeans_candidates nearest centroids only (docs/cuda.md,
    # "Candidate assignment"); 0 measures every centroid.
    kmeans_candidates: int = 0
    kmeans_iters_init: int = 14
    kmeans_iters_step: int = 2
    seed: int = 0
    scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)
    # The schedule: a call is sparse once the step is past floor(first_times_fp * steps) and the
    # layer index is at least floor(first_layers_fp * layers).
    first_times_fp: float = 0.2
    first_layers_fp: float = 0.03
    # k-means iterations run during each dense step of a layer that will turn sparse (0 = off). A
    # layer whose centroids were warmed this way starts its sparse calls with kmeans_iters_step.
    kmeans_iters_warmup: int = 0
    # Checks Q, K, V for NaN/Inf before each sparse call. It reads the answer back to the host (one
    # stream sync per call) and cannot run under CUDA graph capture, so it is off by default.
    check_finite: bool = False
    # Budget and routing (docs/ear.md); the defaults are SVG2 as published and the C++ Config's.
    # density > 0 replaces top_p by, per (batch item, head), the smallest top-p whose selection
    # computes this share of the video query-key pairs: a speed budget, equal across methods.
    density: float = 0.0
    # "top_p": SVG2's top-p prefix; "error_aware": SVG-EAR, the blocks with the largest probe error
    # per area within SVG2's area (at top_p or density), the top ear_keep_ratio always computed.
    routing: str = "top_p"
    # Skipped video key clusters still count through their key and value centroids, merged through
    # the log-sum-exp (SVG-EAR's compensation; with routing "top_p": SVG2 plus compensation).
    compensate: bool = False
    ear_gamma: float = 1.0        # error_aware: probe error divided by area ** ear_gamma
    ear_keep_ratio: float = 0.05  # error_aware: max(1, floor(ratio * Ck)) top clusters always kept (0: none)
    # ear-plus refinements (each needs routing "error_aware"; spread, pair values and split also
    # compensate). CPU only so far: a CUDA call with any of them raises NotImplementedError.
    ear_spread: bool = False       # compensation logits gain the keys' spread seen from the query centroid
    ear_pair_values: bool = False  # values per (query, key cluster) pair, weighted by attention
    ear_head_budget: bool = False  # one area budget per head instead of one per query cluster
    ear_split: bool = False        # two sub-centroids per key cluster in the compensation
    # After the selection, move a few video queries between query clusters so that fewer
    # 64-row blocks carry padding rows (round_query_clusters, docs/attention.md). CPU and CUDA.
    round_q_clusters: bool = False
    # FP8: "fp8_e4m3" computes the sparse attention's Q K^T and P V in FP8 E4M3 with fp32 scales
    # (docs/fp8.md; the clusters and the selection do not change). The CPU backend is the reference;
    # CUDA runs the Hopper e4m3 kernel (H100/H200, head dim 128; other GPUs and head dims raise
    # NotImplementedError). "native": the inputs' own dtype.
    attention_dtype: str = "native"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError for a field out of range. The fields the engine takes are checked by its
        own rule (Config::validate, through torch.ops.sapattn.check_config), with the message a call
        would give; the host's fields (HOST_FIELDS) here."""
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"SVG2Config: {what}")

        need(self.q_clusters is None or self.q_clusters >= 1, f"q_clusters must be None or >= 1, got {self.q_clusters}")
        need(self.k_clusters is None or self.k_clusters >= 1, f"k_clusters must be None or >= 1, got {self.k_clusters}")
        need(self.kmeans_iters_warmup >= 0, f"kmeans_iters_warmup must be >= 0, got {self.kmeans_iters_warmup}")
        need(0.0 <= self.first_times_fp <= 1.0, f"first_times_fp must be in [0, 1], got {self.first_times_fp}")
        need(0.0 <= self.first_layers_fp <= 1.0, f"first_layers_fp must be in [0, 1], got {self.first_layers_fp}")
        need(0 <= self.seed < 2**63, f"seed must be in [0, 2^63), got {self.seed}")  # the op's int is int64
        from . import _library  # loads the op; imported here, as attention.py imports this module

        _library.check_config(self)

    @property
    def ear_plus(self) -> bool:
        """Whether any ear-plus refinement is on (CPU only so far)."""
        return self.ear_spread or self.ear_pair_values or self.ear_head_budget or self.ear_split

    def with_method(self, method: str) -> "SVG2Config":
        """This config running one of the methods of `sapattn eval --method` (docs/ear.md):
        "sap" (SVG2: top-p routing, compensation and the ear-plus fields as they are set), "ear"
        (SVG-EAR as published: error-aware routing plus compensation, the ear-plus fields off) or
        "ear-plus" (EAR with the refinements that won, as eval::use_ear_plus: key spread, split key
        clusters, one budget per head). Budget fields (top_p, density) are kept."""
        if method == "sap":
            return self.replace(routing="top_p", ear_spread=False, ear_pair_values=False, ear_head_budget=False,
                                ear_split=False)
        plus = method == "ear-plus"
        if method not in ("ear", "ear-plus"):
            raise ValueError(f"SVG2Config: method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        return self.replace(routing="error_aware", compensate=True, ear_spread=plus, ear_pair_values=False,
                            ear_head_budget=plus, ear_split=plus)

    def replace(self, **changes) -> "SVG2Config":
        return dataclasses.replace(self, **changes)

    def cluster_counts(self, video_tokens: int) -> Tuple[int, int]:
        """(query clusters, key clusters) for a call with this many video tokens. A count left None is
        one query cluster per 252 video tokens (at most 300) and one key cluster per 75.6 (at most
        1000): the official 720p counts at 75,600 tokens, the same tokens per cluster below. A count
        given that exceeds the video tokens raises ValueError: it would leave clusters empty by
        construction and cost time for nothing."""
        def scaled(per: float, cap: int) -> int:
            return min(max(1, math.ceil(video_tokens / per)), cap)

        q = scaled(_TOKENS_PER_Q_CLUSTER, _MAX_Q_CLUSTERS) if self.q_clusters is None else self.q_clusters
        k = scaled(_TOKENS_PER_K_CLUSTER, _MAX_K_CLUSTERS) if self.k_clusters is None else self.k_clusters
        for name, count, per, cap in (("q_clusters", q, _TOKENS_PER_Q_CLUSTER, _MAX_Q_CLUSTERS),
                                      ("k_clusters", k, _TOKENS_PER_K_CLUSTER, _MAX_K_CLUSTERS)):
            if count > video_tokens:
                raise ValueError(f"SVG2Config: {name}={count} exceeds the {video_tokens} video tokens of this call: a "
                                 f"cluster needs at least one token; leave {name}=None for one cluster per {per:g} "
                                 f"video tokens (at most {cap})")
        return q, k

    # -- presets (the official scripts' settings) -----------------------------------------------
    # The 720p preset is the defaults: 300 / 1000 clusters at 720p, scaled on shorter sequences. The
    # others fix the official counts of their resolution (a shorter sequence must set its own).
    @classmethod
    def wan_t2v_720p(cls, **changes) -> "SVG2Config":
        return cls(**changes)

    @classmethod
    def wan_480p(cls, **changes) -> "SVG2Config":
        return cls(**{"q_clusters": 200, "k_clusters": 1000, **changes})

    @classmethod
    def hunyuan_720p(cls, **changes) -> "SVG2Config":
        return cls(**{"q_clusters": 400, "k_clusters": 1000, "first_times_fp": 0.1, **changes})

    def with_fixed_density(self, density: float) -> "SVG2Config":
        """A fixed budget instead of top-p: every query cluster keeps its floor(density * Ck)
        best-scored key clusters and nothing more (top_p so small that only rank 0 would pass, and
        min_kc_ratio = density). The density reached is close to `density` but depends on the kept
        clusters' sizes; the ops report it. Used to benchmark at a set density on models whose
        attention is diffuse (randomly initialised weights), where top-p keeps almost everything.
        The `density` field is the other budget: it searches the top-p per head that meets the
        density, so the reached density is close to it and top-p's selection rule stays; this one
        clears it."""
        if not (0.0 < density <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {density}")
        return self.replace(top_p=1e-6, min_kc_ratio=density, density=0.0)

    # -- the schedule ---------------------------------------------------------------------------
    def dense_steps(self, num_steps: int) -> int:
        return math.floor(self.first_times_fp * num_steps)

    def dense_layers(self, num_layers: int) -> int:
        return math.floor(self.first_layers_fp * num_layers)

    def layer_is_sparse(self, layer: int, num_layers: int) -> bool:
        return layer >= self.dense_layers(num_layers)

    def step_is_sparse(self, step: int, num_steps: int) -> bool:
        return step >= self.dense_steps(num_steps)
