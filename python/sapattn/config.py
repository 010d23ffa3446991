"""SVG2 configuration: the method's knobs and the schedule that decides which calls are sparse.

Defaults are the official Wan 2.1 T2V 720p script's (see ../shared/ANCHORS.md in the project):
300 query clusters, 1000 key clusters, top-p 0.9, min_kc_ratio 0.10, 50 k-means iterations at a
layer's first sparse call and 2 after, dense for the first 20% of the steps and 3% of the layers."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class SVG2Config:
    q_clusters: int = 300
    k_clusters: int = 1000
    top_p: float = 0.9
    min_kc_ratio: float = 0.10
    kmeans_iters_init: int = 50
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"SVG2Config: {what}")

        need(self.q_clusters >= 1, f"q_clusters must be >= 1, got {self.q_clusters}")
        need(self.k_clusters >= 1, f"k_clusters must be >= 1, got {self.k_clusters}")
        need(math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        need(math.isfinite(self.min_kc_ratio) and 0.0 <= self.min_kc_ratio <= 1.0,
             f"min_kc_ratio must be in [0, 1], got {self.min_kc_ratio}")
        need(self.kmeans_iters_init >= 0, f"kmeans_iters_init must be >= 0, got {self.kmeans_iters_init}")
        need(self.kmeans_iters_step >= 0, f"kmeans_iters_step must be >= 0, got {self.kmeans_iters_step}")
        need(self.kmeans_iters_warmup >= 0, f"kmeans_iters_warmup must be >= 0, got {self.kmeans_iters_warmup}")
        need(math.isfinite(self.scale) and self.scale >= 0.0, f"scale must be finite and >= 0, got {self.scale}")
        need(0.0 <= self.first_times_fp <= 1.0, f"first_times_fp must be in [0, 1], got {self.first_times_fp}")
        need(0.0 <= self.first_layers_fp <= 1.0, f"first_layers_fp must be in [0, 1], got {self.first_layers_fp}")
        need(0 <= self.seed < 2**63, f"seed must be in [0, 2^63), got {self.seed}")

    def replace(self, **changes) -> "SVG2Config":
        return dataclasses.replace(self, **changes)

    # -- presets (ANCHORS.md) -------------------------------------------------------------------
    @classmethod
    def wan_t2v_720p(cls, **changes) -> "SVG2Config":
        return cls(**changes)

    @classmethod
    def wan_480p(cls, **changes) -> "SVG2Config":
        return cls(**{"q_clusters": 200, **changes})

    @classmethod
    def hunyuan_720p(cls, **changes) -> "SVG2Config":
        return cls(**{"q_clusters": 400, "first_times_fp": 0.1, **changes})

    def with_fixed_density(self, density: float) -> "SVG2Config":
        """A fixed budget instead of top-p: every query cluster keeps its floor(density * Ck)
        best-scored key clusters and nothing more (top_p so small that only rank 0 would pass, and
        min_kc_ratio = density). The density reached is close to `density` but depends on the kept
        clusters' sizes; the ops report it. Used to benchmark at a set density on models whose
        attention is diffuse (randomly initialised weights), where top-p keeps almost everything."""
        if not (0.0 < density <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {density}")
        return self.replace(top_p=1e-6, min_kc_ratio=density)

    # -- the schedule ---------------------------------------------------------------------------
    def dense_steps(self, num_steps: int) -> int:
        return math.floor(self.first_times_fp * num_steps)

    def dense_layers(self, num_layers: int) -> int:
        return math.floor(self.first_layers_fp * num_layers)

    def layer_is_sparse(self, layer: int, num_layers: int) -> bool:
        return layer >= self.dense_layers(num_layers)

    def step_is_sparse(self, step: int, num_steps: int) -> bool:
        return step >= self.dense_steps(num_steps)
