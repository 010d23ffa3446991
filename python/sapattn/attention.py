"""The module API: SVG2 attention and dense attention on torch tensors, with the k-means state of a
layer held in torch tensors.

Layouts follow diffusers and FlashAttention: q, k, v and the output are [B, S, H, D]. LSE is
[B, H, S] float32 (natural log). CUDA tensors run on the current stream of their device; CPU tensors
on sapattn's CPU backend with torch's intra-op threads."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from . import _library  # loads torch.ops.sapattn
from .config import DEFAULTS_UNLIKE_CPP, HOST_FIELDS, SVG2Config

# The arguments of torch.ops.sapattn.svg2_attention that a call supplies itself. Every other
# argument is the SVG2Config field of its name: the op's schema, generated from one table in
# python/csrc/torch_ops.cpp, is the list of those fields and gives their C++ defaults.
_CALL_ARGUMENTS = ("q", "k", "v", "q_centroids", "k_centroids", "initialize", "text_tokens", "prompt_length",
                   "return_lse", "key_shard_index", "key_shard_count", "sample_ids")


def _config_arguments(arguments) -> Tuple[str, ...]:
    """The names of the op's arguments (schema arguments: .name, .default_value) that SVG2Config
    fields give, in schema order. Raises ImportError where the op and SVG2Config disagree: an
    argument that is neither the call's nor a field, a field the op does not take (other than the
    host's, config.HOST_FIELDS), or a default unlike the C++ Config's (other than
    config.DEFAULTS_UNLIKE_CPP's)."""
    fields = {f.name: f for f in dataclasses.fields(SVG2Config)}
    names = tuple(a.name for a in arguments if a.name not in _CALL_ARGUMENTS)
    problems = [f"the op takes {name}, which SVG2Config has no field for" for name in names if name not in fields]
    problems += [f"SVG2Config.{name} is no argument of the op" for name in fields
                 if name not in names and name not in HOST_FIELDS]
    problems += [f"SVG2Config.{a.name} defaults to {fields[a.name].default!r}, the C++ Config to {a.default_value!r}"
                 for a in arguments if a.name in fields and a.name not in DEFAULTS_UNLIKE_CPP
                 and fields[a.name].default != a.default_value]
    if problems:
        raise ImportError(f"sapattn: SVG2Config (python/sapattn/config.py) and the op sapattn::svg2_attention of "
                          f"{_library.LIBRARY_PATH} disagree: {'; '.join(problems)}. Rebuild the library from the same "
                          "checkout, or change both sides (the op's arguments: kSvg2Options in "
                          "python/csrc/torch_ops.cpp)")
    return names


_CONFIG_ARGUMENTS = _config_arguments(torch.ops.sapattn.svg2_attention.default._schema.arguments)


@dataclass
class BranchState:
    """k-means centroids of one layer and one classifier-free-guidance branch, per batch item and
    head: q [B, H, Cq, D] and k [B, H, Ck, D] float32 on the device of the calls. `calls` counts
    the sparse calls that used them; `warm_iters` the warm-up iterations run during dense steps.
    The counters are host ints: svg2_attention and warm_centroids count eager calls only (inside a
    torch.compile'd region an int that changes at every call would be a guard that fails at every
    call); sapattn.diffusers counts its calls, compiled or not, after each forward."""

    q_centroids: Optional[torch.Tensor] = None
    k_centroids: Optional[torch.Tensor] = None
    calls: int = 0
    warm_iters: int = 0

    @property
    def initialized(self) -> bool:
        return self.q_centroids is not None

    def reset(self) -> None:
        self.q_centroids = self.k_centroids = None
        self.calls = self.warm_iters = 0

    def prepare(self, q: torch.Tensor, config: SVG2Config, text_tokens: int = 0) -> bool:
        """Makes sure centroids of the right shape exist for q ([B, S, H, D], whose last
        `text_tokens` tokens are text); returns True when they are new and must be initialised. The
        cluster counts are the config's for the video tokens (SVG2Config.cluster_counts). A state
        that caches another shape, device or cluster count is an error (call reset() when the batch,
        heads, config or, with counts that scale, the sequence length change)."""
        if q.dim() != 4:
            raise ValueError(f"sapattn: q must be [batch, seq, heads, head_dim], got shape {tuple(q.shape)}")
        batch, seq, heads, dim = q.shape
        # An empty q or a text that fills the sequence is the op's to report, in its own words.
        usable = q.numel() > 0 and seq > text_tokens
        q_clusters, k_clusters = config.cluster_counts(seq - text_tokens) if usable else (1, 1)
        want_q = (batch, heads, q_clusters, dim)
        want_k = (batch, heads, k_clusters, dim)
        if self.initialized:
            if (tuple(self.q_centroids.shape) != want_q or tuple(self.k_centroids.shape) != want_k
                    or self.q_centroids.device != q.device):
                raise ValueError(
                    f"sapattn: this branch state holds centroids {tuple(self.q_centroids.shape)} / "
                    f"{tuple(self.k_centroids.shape)} on {self.q_centroids.device}, but the call needs {want_q} / "
                    f"{want_k} on {q.device}; call reset() when the batch, heads, cluster counts or sequence "
                    "length change")
            return False
        self.q_centroids = torch.empty(want_q, dtype=torch.float32, device=q.device)
        self.k_centroids = torch.empty(want_k, dtype=torch.float32, device=q.device)
        return True


@contextlib.contextmanager
def _fresh_on_failure(state: BranchState, initialize: bool):
    """A call that was to initialise a state and failed leaves it fresh, never holding the
    uninitialised centroids a later call would warm-start from."""
    try:
        yield
    except BaseException:
        if initialize:
            state.reset()
        raise


class LayerState:
    """One BranchState per classifier-free-guidance branch id (0 = the first call of a step, ...)."""

    def __init__(self) -> None:
        self.branches: Dict[int, BranchState] = {}

    def branch(self, branch_id: int = 0) -> BranchState:
        state = self.branches.get(branch_id)
        if state is None:
            state = self.branches[branch_id] = BranchState()
        return state

    def reset(self) -> None:
        self.branches.clear()


def svg2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SVG2Config, state: BranchState, *,
                   text_tokens: int = 0, prompt_length: Union[int, Sequence[int]] = 0, return_lse: bool = False,
                   key_shard: Tuple[int, int] = (0, 1), sample_ids: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """SVG2 attention of one layer call. q, k, v: [B, S, H, D], float16/bfloat16 (float32 too on
    the CPU), S = video tokens followed by `text_tokens` text tokens of which the first
    `prompt_length` are the prompt (HunyuanVideo's joint attention; 0 text tokens for video only).
    prompt_length may be one count per batch item. key_shard = (i, n) attends over share i of n of
    the kept key clusters (those with index % n == i): the n shares' outputs combine by their LSE
    into the whole call's (sequence parallelism splits a head's keys across devices this way).
    sample_ids ([B, H] int32, default b*H + h) names each (batch item, head)'s initial k-means
    sample, so that a head run apart from the others (on another device) samples the same points.
    Returns (out [B, S, H, D] in q's dtype, lse [B, H, S] float32 or None, density [B, H] float32).
    The state's centroids are initialised (the config's kmeans_seeding, then kmeans_iters_init
    iterations) on its first call and warm-started (kmeans_iters_step iterations) after.

    The config's budget (top_p or density), routing, compensation and ear-plus fields apply as in
    the C++ Config (docs/ear.md), on the CPU and on CUDA. attention_dtype="fp8_e4m3" (the FP8
    attention; docs/fp8.md) runs on the CPU and, on CUDA, on Hopper GPUs at head dim 128: elsewhere a
    CUDA call with it raises NotImplementedError before it touches the state. Compensation needs the whole key set: with
    key_shard count > 1 it raises ValueError.

    Inference only: the outputs have no backward (calling it raises RuntimeError). A NaN in q or k
    comes back as NaN in the rows it reaches, as in torch's attention, on the CPU (docs/torch.md)."""
    result = svg2_attention_uncounted(q, k, v, config, state, text_tokens=text_tokens, prompt_length=prompt_length,
                                      return_lse=return_lse, key_shard=key_shard, sample_ids=sample_ids)
    if not torch.compiler.is_compiling():
        state.calls += 1
    return result


def svg2_attention_uncounted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SVG2Config,
                             state: BranchState, *, text_tokens: int = 0,
                             prompt_length: Union[int, Sequence[int]] = 0, return_lse: bool = False,
                             key_shard: Tuple[int, int] = (0, 1), sample_ids: Optional[torch.Tensor] = None
                             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """svg2_attention without touching state.calls: for callers that count on the host themselves
    (sapattn.diffusers, whose forwards may be compiled)."""
    initialize = state.prepare(q, config, text_tokens)
    lengths = [prompt_length] * q.shape[0] if isinstance(prompt_length, int) else list(prompt_length)
    if len(lengths) != q.shape[0]:
        raise ValueError(f"sapattn: {len(lengths)} prompt lengths for a batch of {q.shape[0]}")

    options = {name: getattr(config, name) for name in _CONFIG_ARGUMENTS}

    def call(rows: slice, length: int, ids: Optional[torch.Tensor]):
        return torch.ops.sapattn.svg2_attention(
            q[rows], k[rows], v[rows], state.q_centroids[rows], state.k_centroids[rows], initialize,
            text_tokens=text_tokens, prompt_length=length, return_lse=return_lse, key_shard_index=key_shard[0],
            key_shard_count=key_shard[1], sample_ids=ids, **options)

    with _fresh_on_failure(state, initialize):
        if all(n == lengths[0] for n in lengths):
            out, lse, density = call(slice(None), lengths[0], sample_ids)
        else:
            # The text rule takes one prompt length per call: items with their own go one by one,
            # each on its own rows of the state and with the sample stream it has in the batch.
            heads = q.shape[2]
            if sample_ids is None:
                sample_ids = (torch.arange(q.shape[0], device=q.device)[:, None] * heads
                              + torch.arange(heads, device=q.device)).to(torch.int32)
            parts = [call(slice(b, b + 1), n, sample_ids[b:b + 1]) for b, n in enumerate(lengths)]
            out, lse, density = (torch.cat([p[i] for p in parts]) for i in range(3))
    return out, (lse if return_lse else None), density


def warm_centroids(q: torch.Tensor, k: torch.Tensor, config: SVG2Config, state: BranchState, iters: int, *,
                   text_tokens: int = 0) -> None:
    """Runs `iters` k-means iterations of the video queries and keys into the state without
    attending (used during dense steps, so that the first sparse call can start warm). A new state
    is seeded first as svg2_attention's initialisation seeds it (the config's kmeans_seeding, the same
    seeds)."""
    warm_centroids_uncounted(q, k, config, state, iters, text_tokens=text_tokens)
    if not torch.compiler.is_compiling():
        state.warm_iters += iters


def warm_centroids_uncounted(q: torch.Tensor, k: torch.Tensor, config: SVG2Config, state: BranchState, iters: int,
                             *, text_tokens: int = 0) -> None:
    """warm_centroids without touching state.warm_iters (see svg2_attention_uncounted)."""
    _check_warm_inputs(q, k, text_tokens)
    initialize = state.prepare(q, config, text_tokens)
    video = q.shape[1] - text_tokens
    with _fresh_on_failure(state, initialize):
        seeding = {"seeding": config.kmeans_seeding, "sample_factor": config.kmeans_sample_factor}
        torch.ops.sapattn.kmeans(q[:, :video], state.q_centroids, initialize, iters, config.seed, **seeding)
        torch.ops.sapattn.kmeans(k[:, :video], state.k_centroids, initialize, iters, config.seed, keys=True, **seeding)


def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(str(n) for n in t.shape) + "]"


def _check_warm_inputs(q: torch.Tensor, k: torch.Tensor, text_tokens: int) -> None:
    """What svg2_attention's op checks of q and k, in the same terms: warm_centroids hands the k-means
    op slices of them, whose own messages would speak of points and centroids (or, for a text
    longer than the sequence, of no problem at all)."""
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"sapattn: {name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"sapattn: k must have q's shape {_shape(q)} ([B,S,H,D]), got {_shape(k)}")
    if q.numel() == 0:
        raise ValueError(f"sapattn: q is empty ({_shape(q)} as [B,S,H,D]): warm_centroids needs B, S, H and D >= 1")
    if text_tokens < 0:
        raise ValueError(f"sapattn: text_tokens must be >= 0, got {text_tokens}")
    if text_tokens >= q.shape[1]:
        raise ValueError(f"sapattn: text_tokens ({text_tokens}) must leave at least one video token in a sequence "
                         f"of {q.shape[1]}")


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 0.0,
                    return_lse: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Full attention with sapattn's kernels. q, k, v: [B, S, H, D]; scale 0 means 1/sqrt(D).
    Inference only, like svg2_attention."""
    out, lse = torch.ops.sapattn.dense_attention(q, k, v, scale, return_lse)
    return out, (lse if return_lse else None)


def attention_kernel(q: torch.Tensor) -> str:
    """The kernel that would run for q's device, dtype and head dim, or why none would."""
    return torch.ops.sapattn.attention_kernel(q)
