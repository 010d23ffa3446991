"""A denoising loop over a bare transformer as the diffusers pipelines run one: a flow-matching
scheduler, classifier-free guidance as two transformer calls per step, each inside
`transformer.cache_context("cond" | "uncond", step_index=..., sigma=..., num_inference_steps=...)`
(what diffusers' cache hooks read), and the stateful caches reset at the end (as
`DiffusionPipeline.maybe_free_model_hooks` does). It drives the tiny Wan and HunyuanVideo
transformers of tiny_models.py, so that the cache hooks and sapattn's schedule are tested on both
models without text encoders or a VAE.

`Generation` is also what sapattn.diffusers.enable() takes as a pipeline: it has a `transformer`
and a `scheduler`, whose set_timesteps and step sapattn wraps to count the steps."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch


class Generation:
    def __init__(self, transformer, cond: dict, uncond: dict, *, guidance: float = 5.0, shift: float = 7.0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        self.cond, self.uncond, self.guidance = cond, uncond, guidance
        self.step_index = -1  # the step being denoised, as the loop counts it (for spies)
        self.branch_name = ""  # "cond" or "uncond" while the transformer runs
        self.timestep = None  # the current step's timestep (PyramidAttentionBroadcast's callback reads it)

    def __call__(self, num_steps: int, *, on_step_end: Optional[Callable[[int, torch.Tensor], None]] = None
                 ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Runs the loop; returns the final latents and the latents after each step."""
        latents = self.cond["hidden_states"]
        self.scheduler.set_timesteps(num_steps, device=latents.device)
        batch = latents.shape[0]
        trajectory = []
        with torch.no_grad():
            for i, t in enumerate(self.scheduler.timesteps):
                self.step_index, self.timestep = i, float(t)
                context = dict(step_index=i, sigma=float(self.scheduler.sigmas[i]), num_inference_steps=num_steps)
                predictions = []
                for name, inputs in (("cond", self.cond), ("uncond", self.uncond)):
                    self.branch_name = name
                    with self.transformer.cache_context(name, **context):
                        call = dict(inputs, hidden_states=latents, timestep=t.expand(batch), return_dict=False)
                        predictions.append(self.transformer(**call)[0])
                cond, uncond = predictions
                latents = self.scheduler.step(uncond + self.guidance * (cond - uncond), t, latents,
                                              return_dict=False)[0]
                trajectory.append(latents.clone())
                if on_step_end is not None:
                    on_step_end(i, latents)
        self.branch_name = ""
        self.transformer._reset_stateful_cache()
        return latents, trajectory


class ProcessorSpy:
    """Stands in for an attention processor and records each call that reaches it as
    (step, branch, layer), the step and branch as the loop (`Generation`) counts them: an account
    of which layers ran that owes nothing to sapattn's own counting. The signature names
    `image_rotary_emb` because diffusers' legacy Attention (HunyuanVideo) passes only the keyword
    arguments a processor names; Wan passes its rotary embedding in that position."""

    def __init__(self, inner, layer: int, generation: Generation, calls: list):
        self.inner, self.layer, self.generation, self.calls = inner, layer, generation, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        self.calls.append((self.generation.step_index, self.generation.branch_name, self.layer))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args,
                          **kwargs)


def spy_on(modules, generation: Generation) -> list:
    """Wraps the current processor of each (layer, attention module) in a ProcessorSpy; returns the
    list the calls go to. The spy is set as a plain attribute, so that sapattn.diffusers.disable()
    puts back the processor it saved at enable() and the spy goes with it."""
    calls: list = []
    for layer, module in modules:
        module.processor = ProcessorSpy(module.processor, layer, generation, calls)
    return calls
