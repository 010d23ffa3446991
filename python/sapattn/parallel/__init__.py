"""Sequence parallelism for SVG2 over torch.distributed: Ulysses head parallelism with head load
balancing, and key-cluster shards combined by LSE for head counts that do not divide the ranks."""

from .heads import Assignment, balance, contiguous, replicas_for
from .shutdown import shutdown
from .ulysses import SequenceParallelSVG2

__all__ = ["SequenceParallelSVG2", "Assignment", "balance", "contiguous", "replicas_for", "shutdown"]
