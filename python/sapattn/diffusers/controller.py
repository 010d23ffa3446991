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
DEFAULT_NUM_STEPS steps (the diffusers pipelines' default), with a warning.

Host state and torch.compile. Everything that changes from one forward to the next (the step, the
calls in it, the branch, the telemetry's step numbers, the call counters of each state) lives on
the host and changes only outside the model's forward: in the forward pre- and post-hooks (which
torch.compile never traces: `torch.compiler.disable`), the scheduler wrappers and begin()/end_step().
What a layer's processor reads inside a compiled forward takes few values in a whole generation: the
layer's place in the schedule (a constant), whether this step is past the dense warm-up (a bool,
`step_sparse`), whether the layer's state is initialised, and the forward's prompt lengths
(HunyuanVideo). The state of the forward's CFG branch is handed to each layer by the pre-hook, so
the branch id is not read either: a whole generation compiles three graphs (dense steps, the first
sparse step, the warm sparse steps), tested. Read from the step counter itself, every step would be a
new guard and a recompilation, and the 8 recompilations torch allows by default are spent by the
fourth step of a CFG generation (with fullgraph=True that is an error; without, the rest of the
generation silently runs eager). Each processor logs its calls (mode, the state it used, the
device figures) into its layer's slot; the post-hook folds the logs into the counters and the
telemetry, at the step and branch of the forward.

Step caches (diffusers' enable_cache: FirstBlockCache, MagCache, TaylorSeer, ...) skip blocks or
whole steps inside a forward: a skipped layer makes no call, so its centroids stay as its last
call left them and its counters do not move; the step and branch are counted from the scheduler
and the transformer's forwards, which every cache still makes."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..attention import BranchState, LayerState
from ..config import SVG2Config


# Steps assumed when nothing has said how many there are: num_inference_steps of the Wan 2.1 and
# HunyuanVideo pipelines, the step count SVG2's official settings were made for.
DEFAULT_NUM_STEPS = 50


@dataclass
class CallPlan:
    """What one attention call of one layer does."""

    sparse: bool  # SVG2, else dense
    warmup_iters: int  # k-means iterations to run during this dense call (0 = none)


@dataclass
class LayerSlot:
    """What one layer's processor reads from the controller during a forward, one object per layer
    that the processor holds. Inside a (possibly compiled) forward nothing else is read by layer
    index: under diffusers' regional compilation (compile_repeated_blocks) every block shares one
    compiled code object, and an index read there would be a guard that fails from one block to
    the next (8 blocks spend torch's default recompile limit)."""

    layer: int  # read on the host only (telemetry, errors)
    sparse: bool  # the schedule makes this layer sparse once the step is past the dense warm-up
    state: Optional[BranchState] = None  # the k-means state of the current forward's CFG branch
    # This layer's calls in the current forward, appended inside it and folded after it. One list per
    # layer: a list is guarded on its length, which a shared list would change from block to block.
    log: List[tuple] = field(default_factory=list)


class Controller:
    def __init__(self, config: SVG2Config, num_layers: int, *, telemetry: Union[str, Path, None] = None,
                 measure_recall: bool = False, dense_backend: str = "stock",
                 branches_per_step: Optional[int] = None) -> None:
        if dense_backend not in ("stock", "sapattn"):
            raise ValueError(f"dense_backend must be 'stock' or 'sapattn', got {dense_backend!r}")
        if branches_per_step is not None and branches_per_step < 1:
            raise ValueError(f"branches_per_step must be >= 1, got {branches_per_step}")
        self.num_layers = num_layers
        self.slots = [LayerSlot(layer, sparse=False) for layer in range(num_layers)]
        self.config = config  # validates it and fixes which layers are dense (the property below)
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
        # Whether the current step is past the dense warm-up: what the processors read instead of the
        # step (see the module docstring). Updated wherever the step or the step count changes.
        self.step_sparse = False  # set by _update_phase() below
        # Per-forward values an adapter reads from the model's inputs on the host before the forward
        # (HunyuanVideo's prompt lengths), so that no layer reads a device value back.
        self.forward_inputs: dict = {}
        self._records: List[dict] = []
        self._parallel = {}  # id(context-parallel config) -> SequenceParallelSVG2
        self._warned_default_steps = False
        if self.telemetry_path is not None:
            self.telemetry_path.parent.mkdir(parents=True, exist_ok=True)
            self.telemetry_path.write_text("")
        self._update_phase()

    @property
    def config(self) -> SVG2Config:
        return self._config

    @config.setter
    def config(self, config: SVG2Config) -> None:
        """Validates the config and fixes from it which layers the schedule keeps dense."""
        config.validate()
        self._config = config
        for slot in self.slots:
            slot.sparse = config.layer_is_sparse(slot.layer, self.num_layers)
        if hasattr(self, "_warned_default_steps"):  # a config replaced after construction
            self._update_phase()

    # -- the generation (host only: never inside a compiled forward) -------------------------------
    def begin(self, num_steps: int) -> None:
        """A new generation of `num_steps` denoising steps: forgets every layer's k-means state."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        self.flush()
        self.num_steps = num_steps
        self.step = 0
        self.calls_in_step = 0
        for layer in self.layers.values():
            layer.reset()
        for slot in self.slots:
            slot.state = None
        self.release_parallel()
        self._update_phase()

    def end_step(self) -> None:
        """The current denoising step is done: writes its telemetry, rebalances heads across
        ranks under sequence parallelism (every rank ends its steps together), counts the step."""
        self.flush()
        for sp in self._parallel.values():
            sp.rebalance()
        self.step += 1
        self.calls_in_step = 0
        self._update_phase()

    def on_forward(self, forward_inputs: Optional[dict] = None) -> None:
        """A transformer forward starts: it is the next CFG branch of the current step, or the
        first of the next step once the step has had its branches_per_step forwards.
        forward_inputs: what the adapter read from the forward's inputs (Controller.forward_inputs)."""
        self._fold()  # a forward that raised left its calls behind
        if self.branches_per_step is not None and self.calls_in_step >= self.branches_per_step:
            self.end_step()
        self.branch = self.calls_in_step
        self.calls_in_step += 1
        self.forward_inputs = forward_inputs or {}
        self._update_phase(warn=True)
        # The state each layer uses in this forward, made before it and handed to the layer's slot:
        # a compiled forward then reads neither the branch id nor a dict that gains keys (either
        # would be a guard, the branch one that fails at every other forward), so both CFG branches
        # share one graph.
        for slot in self.slots:
            slot.state = self.layer_state(slot.layer).branch(self.branch) if slot.sparse else None

    def on_forward_end(self) -> None:
        """A transformer forward has returned: its calls go into the counters and the telemetry."""
        self._fold()

    def steps_for_schedule(self) -> int:
        """The step count the schedule uses: the generation's, or DEFAULT_NUM_STEPS while unknown."""
        return self.num_steps if self.num_steps is not None else DEFAULT_NUM_STEPS

    def _update_phase(self, warn: bool = False) -> None:
        cfg = self._config
        num_steps = self.steps_for_schedule()
        if warn and self.num_steps is None and cfg.first_times_fp > 0.0 and not self._warned_default_steps:
            self._warned_default_steps = True
            warnings.warn(f"sapattn: the number of denoising steps is unknown, so the first "
                          f"{cfg.dense_steps(num_steps)} steps of a {num_steps}-step generation stay dense "
                          "(first_times_fp); pass num_steps= to sapattn.diffusers.enable() or call "
                          "controller.begin(num_steps) for another count", stacklevel=4)
        self.step_sparse = cfg.step_is_sparse(self.step, num_steps)

    # -- per call (inside the forward, possibly compiled: reads no counter) -------------------------
    def plan(self, slot: LayerSlot) -> CallPlan:
        sparse = slot.sparse and self.step_sparse
        warmup = self._config.kmeans_iters_warmup if (slot.sparse and not self.step_sparse) else 0
        return CallPlan(sparse=sparse, warmup_iters=warmup)

    def state(self, slot: LayerSlot) -> BranchState:
        """The k-means state of the slot's layer in the current forward (its CFG branch's)."""
        if slot.state is None:  # a call outside the forward's hooks (a block called by itself)
            slot.state = self.layer_state(slot.layer).branch(self.branch)
        return slot.state

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
        state = self.layers.get(layer)
        if state is None:
            state = self.layers[layer] = LayerState()
        return state

    def record(self, slot: LayerSlot, plan: CallPlan, *, state: Optional[BranchState] = None, warm_iters: int = 0,
               density: Optional[torch.Tensor] = None, recall: Optional[torch.Tensor] = None) -> None:
        """Logs one call: `state` is the BranchState a sparse call used (None when none was, as under
        context parallelism), `warm_iters` the k-means iterations a dense call ran into its layer's
        state. Only a list append, no counter: inside a compiled forward a counter would be a guard
        that fails at every call. _fold() counts on the host after the forward."""
        keep = self.telemetry_path is not None
        slot.log.append((plan.sparse, state, warm_iters,
                          density.mean() if keep and density is not None else None, recall if keep else None))

    def _fold(self) -> None:
        """The logged calls into each state's counters and the telemetry rows, at the current step
        and branch (called before either changes)."""
        for slot in self.slots:
            log, slot.log = slot.log, []
            for sparse, state, warm_iters, density, recall in log:
                if sparse and state is not None:
                    state.calls += 1
                if warm_iters and state is not None:
                    state.warm_iters += warm_iters
                if self.telemetry_path is not None:
                    self._records.append({"step": self.step, "layer": slot.layer, "branch": self.branch,
                                          "mode": "sparse" if sparse else "dense", "density": density,
                                          "recall": recall})

    def flush(self) -> None:
        self._fold()
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
