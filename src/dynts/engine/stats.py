"""What a generation measures, per sequence and per run, and the one rule that books a decode step into both.

Both decode paths (eager and static) and every caller read these figures, so how a step's time, cache length and
compressions are counted lives here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from dynts.config import BudgetConfig


@dataclass
class SequenceStats:
    """Per-sequence figures. time_share_s splits each decode step's wall time evenly over the sequences it
    advanced, so summing shares over any set of sequences gives their true share of the wall clock."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    compressions: int = 0
    evicted_tokens: int = 0  # tokens its compressions dropped from its cache
    peak_kv_tokens: int = 0
    peak_kv_bytes: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    forward_time_s: float = 0.0
    time_share_s: float = 0.0
    forward_share_s: float = 0.0
    latency_s: float = 0.0
    tps: float = 0.0
    tps_forward: float = 0.0
    finish_reason: str = ""

    def finalize(self) -> None:
        self.tps = self.generated_tokens / self.decode_time_s if self.decode_time_s > 0 else 0.0
        self.tps_forward = self.generated_tokens / self.forward_time_s if self.forward_time_s > 0 else 0.0
        self.latency_s = self.prefill_time_s + self.decode_time_s

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunStats:
    """Whole-run figures: tps = generated tokens / decode wall time including scoring and eviction;
    tps_forward = the same over model-forward time only (the paper's timing)."""

    sequences: int = 0
    generated_tokens: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    forward_time_s: float = 0.0
    tps: float = 0.0
    tps_forward: float = 0.0
    peak_kv_tokens: int = 0  # largest total cache length over the batch at any step
    peak_kv_bytes: int = 0
    compressions: int = 0
    evicted_tokens: int = 0
    protected_overflow: int = 0
    steps: list = field(default_factory=list)  # per-step trace when asked for

    def finalize(self) -> None:
        self.tps = self.generated_tokens / self.decode_time_s if self.decode_time_s > 0 else 0.0
        self.tps_forward = self.generated_tokens / self.forward_time_s if self.forward_time_s > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    stats: SequenceStats

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "stats": self.stats.to_dict(),
        }


@dataclass
class GenerationOutput:
    results: list[GenerationResult]
    stats: RunStats


def account_step(
    run: RunStats,
    sequences: list[SequenceStats],
    lengths: list[int],
    compressed: list[bool],
    step_time: float,
    forward_time: float,
    budgets: Sequence[BudgetConfig],
) -> int:
    """Book one decode step that advanced `sequences` (cache lengths after the step, before any compaction; which
    of them were compressed right after it; the budget frame each compresses in). Returns the step's total cache
    length.

    Every sequence is charged the step's whole time (its latency) and an even share of it (so shares sum to the
    wall clock over any set of sequences); a compressed sequence peaked at its budget in that step and dropped
    what its compression does not keep. The run's decode wall time is booked by the caller, which knows the wall
    clock."""
    m = len(sequences)
    for stats, length, was_compressed, budget in zip(sequences, lengths, compressed, budgets):
        stats.decode_time_s += step_time
        stats.forward_time_s += forward_time
        stats.time_share_s += step_time / m
        stats.forward_share_s += forward_time / m
        stats.peak_kv_tokens = max(stats.peak_kv_tokens, budget.budget if was_compressed else length)
        if was_compressed:
            stats.compressions += 1
            stats.evicted_tokens += length - budget.kept_after_compression(length)
    total_kv = sum(lengths)
    run.forward_time_s += forward_time
    run.peak_kv_tokens = max(run.peak_kv_tokens, total_kv)
    return total_kv


def step_record(
    index: int, active: int, step_time: float, forward_time: float, total_kv: int, bytes_per_token: int, compressed
) -> dict:
    """One line of the per-step trace (steps.jsonl of a sweep's probe)."""
    return {
        "step": index,
        "active": active,
        "step_time_s": step_time,
        "forward_time_s": forward_time,
        "kv_tokens": total_kv,
        "kv_bytes": total_kv * bytes_per_token,
        "compressed": list(compressed),
    }
