"""The SVG2 schedule across a generation: which denoising step and which CFG branch a transformer
call belongs to, whether a layer's call is dense or sparse, the per-layer k-means state, and the
per-step telemetry.

Steps are counted on the host, with no device read: a pipeline's scheduler announces a new
generation (set_timesteps) and the end of each step (step); each transformer forward inside a step
is the next classifier-free-guidance branch (Wan calls the transformer twice per step, cond then
uncond; a pipeline that batches both branches in one call has one branch whose state holds both
batch items). Without a pipeline, `branches_per_step` forwards make one step (1 unless told
otherwise), or the caller ends each step with end_step(); begin() starts a generation. Until a
scheduler or begin() gives the number of steps, the schedule is that of a generation of
DEFAULT_NUM_STEPS steps (the diffusers pipelines' default), with a warning."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..attention import LayerState
from ..config import SVG2Config


# Steps assumed when nothing has said how many there are: num_inference_steps of the Wan 2.1 and
# HunyuanVideo pipelines, the step count SVG2's official settings were made for.
DEFAULT_NUM_STEPS = 50


@dataclass
class CallPlan:
    """What one attention call of one layer does."""

    sparse: bool  # SVG2, else dense
    branch: int  # classifier-free-guidance branch id
    warmup_iters: int  # k-means iterations to run during this dense call (0 = none)


class Controller:
    def __init__(self, config: SVG2Config, num_layers: int, *, telemetry: Union[str, Path, None] = None,
                 measure_recall: bool = False, dense_backend: str = "stock",
                 branches_per_step: Optional[int] = None) -> None:
        if dense_backend not in ("stock", "sapattn"):
            raise ValueError(f"dense_backend must be 'stock' or 'sapattn', got {dense_backend!r}")
        if branches_per_step is not None and branches_per_step < 1:
            raise ValueError(f"branches_per_step must be >= 1, got {branches_per_step}")
        config.validate()
        self.config = config
        self.num_layers = num_layers
        self.dense_backend = dense_backend
        # Forwards per denoising step when nothing else ends the steps (None: a scheduler does).
        self.branches_per_step = branches_per_step
        self.measure_recall = measure_recall
        self.telemetry_path = Path(telemetry) if telemetry is not None else None
        self.layers: Dict[int, LayerState] = {}
        self.num_steps: Optional[int] = None
        self.step = 0
        self.calls_in_step = 0
        self.branch = 0
        self._records: List[dict] = []
        self._mask_lengths = None  # (mask tensor, prompt lengths) of the current forward
        self._parallel = {}  # id(context-parallel config) -> SequenceParallelSVG2
        self._warned_default_steps = False
        if self.telemetry_path is not None:
            self.telemetry_path.parent.mkdir(parents=True, exist_ok=True)
            self.telemetry_path.write_text("")

    # -- the generation ---------------------------------------------------------------------------
    def begin(self, num_steps: int) -> None:
        """A new generation of `num_steps` denoising steps: forgets every layer's k-means state."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.flush()
        self.num_steps = num_steps
        self.step = 0
        self.calls_in_step = 0
        for layer in self.layers.values():
            layer.reset()
        self.release_parallel()

    def end_step(self) -> None:
        """The current denoising step is done: writes its telemetry, rebalances heads across
        ranks under sequence parallelism (every rank ends its steps together), counts the step."""
        self.flush()
        for sp in self._parallel.values():
            sp.rebalance()
        self.step += 1
        self.calls_in_step = 0

    def on_forward(self) -> None:
        """A transformer forward starts: it is the next CFG branch of the current step, or the
        first of the next step once the step has had its branches_per_step forwards."""
        if self.branches_per_step is not None and self.calls_in_step >= self.branches_per_step:
            self.end_step()
        self.branch = self.calls_in_step
        self.calls_in_step += 1

    # -- per call ---------------------------------------------------------------------------------
    def plan(self, layer: int) -> CallPlan:
        cfg = self.config
        layer_sparse = cfg.layer_is_sparse(layer, self.num_layers)
        num_steps = self.num_steps
        if num_steps is None:
            num_steps = DEFAULT_NUM_STEPS
            if cfg.first_times_fp > 0.0 and not self._warned_default_steps:
                self._warned_default_steps = True
                warnings.warn(f"sapattn: the number of denoising steps is unknown, so the first "
                              f"{cfg.dense_steps(num_steps)} steps of a {num_steps}-step generation stay dense "
                              "(first_times_fp); pass num_steps= to sapattn.diffusers.enable() or call "
                              "controller.begin(num_steps) for another count", stacklevel=2)
        step_sparse = cfg.step_is_sparse(self.step, num_steps)
        sparse = layer_sparse and step_sparse
        warmup = cfg.kmeans_iters_warmup if (layer_sparse and not step_sparse) else 0
        return CallPlan(sparse=sparse, branch=self.branch, warmup_iters=warmup)

    def sequence_parallel(self, cp_config, heads: int):
        """The SVG2 sequence parallelism over the ranks of diffusers' context-parallel mesh (all of
        them, ring and Ulysses dimensions flattened: sapattn assigns heads itself)."""
        key = id(cp_config)
        if key not in self._parallel:
            from ..parallel import SequenceParallelSVG2

            group = cp_config._flattened_mesh.get_group()
            self._parallel[key] = SequenceParallelSVG2(self.config, heads, group)
        return self._parallel[key]

    def release_parallel(self) -> None:
        """Drops the sequence-parallel state and with it every process group this controller holds,
        so that destroy_process_group() can join their worker threads (sapattn.parallel.shutdown)."""
        self._parallel.clear()

    def layer_state(self, layer: int) -> LayerState:
        return self.layers.setdefault(layer, LayerState())

    def prompt_lengths(self, attention_mask: Optional[torch.Tensor], *, video_tokens: int,
                       text_tokens: int) -> Union[int, List[int]]:
        """Prompt tokens per batch item from a joint-attention key mask ([B, 1, 1, N] or [B, N]
        bool, True = attended; the text is right-padded). The same mask object serves every block
        of a forward, so it is read back to the host once per forward."""
        if attention_mask is None:
            return text_tokens
        if self._mask_lengths is not None and self._mask_lengths[0] is attention_mask:
            return self._mask_lengths[1]
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"sapattn: expected a bool attention mask, got {attention_mask.dtype}")
        keys = attention_mask.reshape(attention_mask.shape[0], -1)  # [B, 1, 1, N] -> [B, N]
        if keys.shape[1] != video_tokens + text_tokens:
            raise ValueError(f"sapattn: the attention mask covers {keys.shape[1]} keys, the call has "
                             f"{video_tokens} video + {text_tokens} text tokens")
        lengths = keys[:, video_tokens:].sum(dim=1).tolist()
        self._mask_lengths = (attention_mask, lengths)
        return lengths

    def record(self, layer: int, plan: CallPlan, density: Optional[torch.Tensor],
               recall: Optional[torch.Tensor]) -> None:
        """Keeps one call's figures (device tensors, read back once per step in flush())."""
        if self.telemetry_path is None:
            return
        self._records.append({"step": self.step, "layer": layer, "branch": plan.branch,
                              "mode": "sparse" if plan.sparse else "dense",
                              "density": density.mean() if density is not None else None,
                              "recall": recall if recall is not None else None})

    def flush(self) -> None:
        if self.telemetry_path is None or not self._records:
            self._records = []
            return
        with self.telemetry_path.open("a") as f:
            for r in self._records:
                row = dict(r)
                for key in ("density", "recall"):
                    if isinstance(row[key], torch.Tensor):
                        row[key] = float(row[key])
                    elif row[key] is None and key == "density" and row["mode"] == "dense":
                        row[key] = 1.0
                f.write(json.dumps(row) + "\n")
        self._records = []
