"""What passes between the scheduler and a stepper, and what a stepper is.

The scheduler (scheduler.py) decides which sequence decodes in which row and when; a stepper does the device work
(engine.eager_step.EagerStepper, fast.static_stepper.StaticStepper) and reports which tokens it has learnt. Only
the data below passes between them: the scheduler never calls the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from dynts.config import BudgetConfig, SamplingParams
from dynts.engine.requests import Request
from dynts.engine.stats import SequenceStats

if TYPE_CHECKING:
    import torch

# A stage boundary of one decode step as its stepper clocked it: a host perf_counter reading, or a CUDA event
# recorded in the stream (read at a later sync). A stepper returns a step's marks and reads them back from its
# StepLog once they can be read; the scheduler only carries them.
TimingMark: TypeAlias = "float | torch.cuda.Event"


@dataclass(eq=False)
class LiveSequence:
    """A request being decoded: its settings as resolved against the engine, its tokens so far and its figures."""

    request: Request
    request_id: int
    params: SamplingParams  # the request's sampling params, or the engine's
    budget: BudgetConfig  # the frame its row compresses in: the engine's, or BudgetConfig.scaled to its own budget
    seed: int  # its sampler's seed
    limit: int  # tokens it may generate
    eos: frozenset[int]  # tokens that end it with reason "eos" (none with ignore_eos or teacher forcing)
    stops: frozenset[int]  # its own stop tokens (reason "stop")
    stats: SequenceStats
    index: int = -1  # admission order within the core's run (set when it gets a row)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # tokens already handed out in a RequestOutput
    in_answer: bool = False  # it has generated its end-of-thinking marker
    generator: Any = None  # the eager sampler's RNG

    @property
    def finished(self) -> bool:
        return bool(self.stats.finish_reason)


@dataclass
class StepLog:
    """What the host knows about one decode step when it runs: which sequence each row held, which token index
    it fed, the cache lengths after the step (before compaction), the rows compacted after it, and the step's
    timing marks (its stages' boundaries, for the stepper that made them)."""

    index: int
    sequences: list[LiveSequence | None]
    fed: list[int]
    lengths: list[int]
    compressed: set[int]
    marks: Sequence[TimingMark] = ()


@dataclass
class Poll:
    """What a stepper has learnt since the last poll: new tokens per row (for the sequence the row held when they
    were produced), the steps whose timings are known (step time, forward time), and wall time to book."""

    tokens: list[tuple[LiveSequence, list[int]]] = field(default_factory=list)
    settled: list[tuple[StepLog, float, float]] = field(default_factory=list)
    wall_s: float = 0.0


class Stepper(Protocol):
    """The device side of a decode, over a fixed number of rows of one cache (rows may be released, and grown by a
    stepper with `can_grow`)."""

    cache: Any  # the BudgetedCache its rows live in
    reports_at_once: bool  # tokens are known right after they are chosen (else a chunk late)
    release_in_buckets: bool  # rows left without a sequence are released when the live rows fall to half
    can_grow: bool  # grow(n) adds rows (else a stepper keeps the rows it was built with, or fewer)

    def admit(self, row: int, seq: LiveSequence) -> None:
        """Reset the row, prefill the sequence's prompt there and choose its first token."""

    def step(self, held: list[LiveSequence | None]) -> tuple[Sequence[TimingMark], list[int]]:
        """One decode step of every row: (timing marks, the token index each row fed)."""

    def lengths(self) -> list[int]:
        """Each row's cache length after the step, before any compaction."""

    def compact(self, rows: list[int], budgets: list[BudgetConfig]) -> None:
        """Compress the rows (each at its budget, in its frame) after the step."""

    def record(self, log: StepLog) -> None:
        """Close the step: what the host knew when it ran."""

    def poll(self) -> Poll:
        """What has been learnt since the last poll."""

    def idle(self, row: int) -> None:
        """A row left without a sequence (it must not outgrow the cache until it is released or refilled)."""

    def release(self, live: list[int]) -> None:
        """Keep only these rows (in this order); the others are dropped."""

    def grow(self, rows: int) -> None:
        """Add `rows` empty rows at the end (only with can_grow)."""

    def finishing(self, held: list[LiveSequence | None]) -> bool:
        """For a stepper that learns tokens late: True when no step is needed (every sequence is at its last token)."""

    def flush(self) -> float:
        """Wall seconds not yet booked (chunks never read)."""

    def bytes_per_token(self) -> int:
        """K and V bytes one cached token costs."""

    def close(self) -> None:
        """Release what the stepper holds besides its cache."""
