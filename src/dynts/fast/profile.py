"""Where the fast path's decode time goes: per-stage device time without host syncs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class DecodeProfile:
    """Where the fast path's decode time went, summed over a generate() call. Stage times come from CUDA events
    (device time) on a GPU and from the wall clock on a CPU; wall_s is the decode loop's wall clock."""

    steps: int = 0
    wall_s: float = 0.0
    forward_s: float = 0.0  # decoder + LM head
    scoring_s: float = 0.0  # the policy's per-token scoring (DynTS head) and slot bookkeeping
    sampling_s: float = 0.0  # next-token choice and step bookkeeping
    eviction_s: float = 0.0  # selection + compaction
    capture_s: float = 0.0
    captures: int = 0
    compiled: bool = False  # the forward stage ran compiled (compiled_step.py)
    compile_s: float = 0.0  # first calls of each new shape: tracing and compiling
    compiles: int = 0
    fused: bool = False  # the forward stage ran our fused decoder (fused_decoder.py)
    packed: bool = False  # its projections and the LM head ran on packed weights (packed_linear.py)
    host_reads: int = 0
    kernel: str = ""
    graphs: bool = False
    check_every: int = 1
    fallbacks: list = field(default_factory=list)  # why the run left a faster path (kernel check, capture)

    def shares(self) -> dict[str, float]:
        """Each stage's fraction of the summed stage time."""
        stages = {
            "forward": self.forward_s,
            "scoring": self.scoring_s,
            "sampling": self.sampling_s,
            "eviction": self.eviction_s,
        }
        total = sum(stages.values())
        return {k: v / total if total > 0 else 0.0 for k, v in stages.items()}

    def to_dict(self) -> dict:
        return {**asdict(self), "shares": self.shares()}


class StageClock:
    """Marks between stages without host syncs: CUDA events on a GPU (read at the next sync), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start
