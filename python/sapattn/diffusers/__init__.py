"""diffusers integration: one call turns SVG2 on for a Wan 2.1, HunyuanVideo or HunyuanVideo 1.5
pipeline (or bare transformer), one call turns it off and restores the stock processors exactly.

    import sapattn.diffusers
    controller = sapattn.diffusers.enable(pipe, sapattn.SVG2Config.wan_t2v_720p())
    video = pipe(prompt, num_inference_steps=50).frames[0]
    sapattn.diffusers.disable(pipe)

Tested with diffusers 0.42.1; supported: sapattn.supported_versions.DIFFUSERS (docs/torch.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .. import supported_versions
from ..config import SVG2Config
from . import hunyuan, hunyuan15, wan
from .controller import Controller

__all__ = ["enable", "disable", "Controller", "adapter_for", "ADAPTERS"]

_ATTR = "_sapattn"  # set on each transformer that sapattn is enabled on


def _check_diffusers() -> None:
    """The adapters follow diffusers' model code (processor signatures, block layout, masks): a
    diffusers outside the tested range gets a warning (supported_versions.py)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("diffusers")
    except PackageNotFoundError:  # nothing to adapt to yet; enable() needs a diffusers model anyway
        return
    supported_versions.check("diffusers", found, supported_versions.DIFFUSERS)


_check_diffusers()

# One module per model family (docs/torch.md, "Adding a model"). Each has:
#   TRANSFORMERS                       the diffusers transformer class names it serves
#   DEFAULT_SIZE                       (height, width) of its pipelines' default generation
#   default_config(height, width)      the SVG2 settings for that resolution
#   self_attention_modules(t)          [(layer index, attention module)] whose processor SVG2 replaces
#   make_processor(stock, controller, layer)  the processor standing in for `stock`
#   forward_inputs(args, kwargs)       optional: what the processors need from the forward's inputs,
#                                      read on the host before it (controller.forward_inputs)
ADAPTERS = (wan, hunyuan, hunyuan15)


def adapter_for(transformer):
    """The adapter module of a transformer's class; TypeError naming the supported ones if none."""
    name = type(transformer).__name__
    for adapter in ADAPTERS:
        if name in adapter.TRANSFORMERS:
            return adapter
    supported = ", ".join(n for adapter in ADAPTERS for n in adapter.TRANSFORMERS)
    raise TypeError(f"sapattn.diffusers supports {supported}; got {name}")



def _transformers(target):
    """The transformers of a pipeline (Wan 2.2 pipelines have two), or the transformer itself; a
    torch.compile'd one (OptimizedModule) as the module it wraps, whose processors and hooks the
    compiled one runs."""
    if hasattr(target, "transformer"):
        found = [t for t in (target.transformer, getattr(target, "transformer_2", None)) if t is not None]
        if not found:
            raise TypeError("the pipeline has no transformer")
    else:
        found = [target]
    return [getattr(t, "_orig_mod", t) for t in found]


def _check_device(transformer, config: SVG2Config) -> None:
    """Refuses, at enable() rather than at the first sparse call many steps later, a config whose FP8
    attention the transformer's device cannot run (the op would raise NotImplementedError): the CPU
    emulates it, CUDA runs it on Hopper GPUs (compute capability 9.0) only."""
    device = next(transformer.parameters()).device
    if config.attention_dtype == "native" or device.type == "cpu":
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        raise NotImplementedError(
            f"sapattn: attention_dtype={config.attention_dtype!r} runs on the CPU and on Hopper GPUs (H100, "
            f"H200; docs/fp8.md), and the transformer is on {device}; use attention_dtype='native'")


class _Installation:
    """What enable() changed on one transformer, so that disable() can put it back."""

    def __init__(self, controller: Controller):
        self.controller = controller
        self.processors = []  # (module, stock processor)
        self.hooks = []  # torch hook handles: forward pre-hook and forward hook


def _hook_forward(transformer, adapter, controller: Controller) -> list:
    """The transformer's forward tells the controller when it starts (the next CFG branch or step,
    and what the adapter reads from its inputs) and when it ends (the calls it made are counted).
    Both hooks run on the host and are never traced by torch.compile: they change the counters that
    a compiled forward must not guard on (controller.py's docstring)."""
    read_inputs = getattr(adapter, "forward_inputs", None)

    @torch.compiler.disable
    def before(module, args, kwargs):
        controller.on_forward(read_inputs(args, kwargs) if read_inputs is not None else None)

    @torch.compiler.disable
    def after(module, args, output):
        controller.on_forward_end()

    return [transformer.register_forward_pre_hook(before, with_kwargs=True), transformer.register_forward_hook(after)]


def _hook_scheduler(scheduler, controller: Controller) -> None:
    """Wraps the scheduler's set_timesteps (a new generation) and step (a step done) on the
    instance, so that the class and other instances are untouched."""
    if getattr(scheduler, _ATTR, None) is not None:
        raise RuntimeError("sapattn is already enabled on this pipeline's scheduler: call disable() first")
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    def set_timesteps_and_begin(*args, **kwargs):
        result = set_timesteps(*args, **kwargs)
        controller.begin(len(scheduler.timesteps))
        return result

    def step_and_count(*args, **kwargs):
        result = step(*args, **kwargs)
        controller.end_step()
        return result

    scheduler.set_timesteps = set_timesteps_and_begin
    scheduler.step = step_and_count
    setattr(scheduler, _ATTR, controller)


def _unhook_scheduler(scheduler) -> None:
    if getattr(scheduler, _ATTR, None) is None:
        return
    del scheduler.set_timesteps, scheduler.step  # the class's methods show through again
    delattr(scheduler, _ATTR)


def enable(target, config: Optional[SVG2Config] = None, *, telemetry: Union[str, Path, None] = None,
           measure_recall: bool = False, dense_backend: str = "stock",
           branches_per_step: Optional[int] = None, num_steps: Optional[int] = None) -> Controller:
    """Turns SVG2 on for `target`: a diffusers pipeline (WanPipeline, WanImageToVideoPipeline,
    HunyuanVideoPipeline, HunyuanVideo15Pipeline, ...) or one of their transformers
    (WanTransformer3DModel, HunyuanVideoTransformer3DModel, HunyuanVideo15Transformer3DModel).

    config: the SVG2 config with its schedule (default: the official Wan 2.1 720p settings). Its
      method fields apply to every sparse call: density (budget), routing, compensate and the ear-plus
      fields (config.with_method("ear") / "ear-plus"; ear-plus needs a transformer on the CPU).
    telemetry: a JSON-lines file that gets one row per layer call (step, layer, branch, mode,
      density, and recall when measure_recall is set), written at the end of each step.
    measure_recall: also run dense attention on sparse calls to measure the share of the softmax
      mass kept (costly: for evaluation, not for speed).
    dense_backend: "stock" runs the dense calls of the schedule through diffusers' own processor;
      "sapattn" through sapattn's dense kernel.

    branches_per_step: forwards per denoising step (1, or 2 for CFG as two calls). With a pipeline
      the default None counts steps from its scheduler (set_timesteps, step). A bare transformer
      defaults to 1: every forward is one step and uses branch 0. Either way,
      controller.begin(num_steps) starts a generation (it forgets the k-means state) and
      controller.end_step() may end a step by hand.
    num_steps: denoising steps of the generation, for a bare transformer (a pipeline's scheduler
      says it at each call). Without it and without controller.begin(), the schedule is that of a
      50-step generation (controller.DEFAULT_NUM_STEPS), with a warning when it matters
      (first_times_fp > 0).
    Returns the controller (schedule, state and telemetry)."""
    config = config if config is not None else SVG2Config()
    transformers = _transformers(target)
    for t in transformers:
        adapter_for(t)
        if getattr(t, _ATTR, None) is not None:
            raise RuntimeError("sapattn is already enabled on this transformer: call disable() first")
    for t in transformers:
        _check_device(t, config)
    num_layers = len(adapter_for(transformers[0]).self_attention_modules(transformers[0]))
    if branches_per_step is None and not hasattr(target, "scheduler"):
        branches_per_step = 1
    controller = Controller(config, num_layers, telemetry=telemetry, measure_recall=measure_recall,
                            dense_backend=dense_backend, branches_per_step=branches_per_step)
    if num_steps is not None:
        controller.begin(num_steps)
    for t in transformers:
        adapter = adapter_for(t)
        installed = _Installation(controller)
        for layer, module in adapter.self_attention_modules(t):
            stock = module.processor
            installed.processors.append((module, stock))
            module.set_processor(adapter.make_processor(stock, controller, layer))
        installed.hooks = _hook_forward(t, adapter, controller)
        setattr(t, _ATTR, installed)
    if hasattr(target, "scheduler"):
        _hook_scheduler(target.scheduler, controller)
    return controller


def disable(target) -> None:
    """Restores the stock processors (the very objects that were there) and removes every hook."""
    for t in _transformers(target):
        installed = getattr(t, _ATTR, None)
        if installed is None:
            continue
        installed.controller.flush()
        installed.controller.release_parallel()  # its process-group references (sapattn.parallel.shutdown)
        for module, stock in installed.processors:
            module.set_processor(stock)
        for handle in installed.hooks:
            handle.remove()
        delattr(t, _ATTR)
    if hasattr(target, "scheduler"):
        _unhook_scheduler(target.scheduler)
