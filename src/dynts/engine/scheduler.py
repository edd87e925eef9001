"""The scheduler of both decode paths: which sequence decodes in which row and when, and the books it keeps.

A batch has up to `batch_size` rows; a row decodes one sequence at a time. With continuous batching, when a
row's sequence ends and requests are waiting, the next request is prefilled into that row (its slots, positions
and policy state reset) and joins the next decode step. A fixed KV budget makes this free of memory planning:
every row holds at most B tokens whichever sequence it decodes. When no request waits, finished rows are
released: at once by a stepper whose step costs what its rows cost (the eager engine, which grows its rows again
when requests arrive), in buckets (when the live rows fall to half) by one that captures a CUDA graph per row
count (the static fast path, whose rows are rebuilt once all its sequences have ended). `batching="static"` is
the old behaviour: requests are taken `batch_size` at a time and a batch runs until its last sequence ends.

The scheduler decides and books; it never calls the model. The engine core (core.py) asks it what to do, has the
stepper (stepper.py) do it, and hands it back what the stepper learnt. What is shared by both paths lives here or
below: the stop rule (stopping.py), the compression trigger (BudgetConfig.reached, per row: a request may bring
its own budget), the statistics (stats.py). The static path learns tokens a chunk late, so a step is booked only
once the tokens of that step are known.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from dynts.engine.stats import GenerationResult, RunStats, account_step, step_record
from dynts.engine.stepper import LiveSequence, Poll, StepLog, TimingMark
from dynts.engine.stopping import stop_reason
from dynts.errors import DynTSError

__all__ = ["BATCHING", "LiveSequence", "Poll", "Scheduler", "StepLog", "check_batching"]

BATCHING = ("continuous", "static")


def check_batching(batching: str) -> str:
    """The one rule for --batching: one of BATCHING."""
    if batching not in BATCHING:
        raise DynTSError(f"--batching must be one of {', '.join(BATCHING)}, got {batching!r}")
    return batching


class Scheduler:
    """Rows, the waiting queue and the run's figures; see the module docstring."""

    def __init__(self, engine, run: RunStats, batching: str = "continuous", full_width: bool = False):
        self.batching = check_batching(batching)
        self.full_width = full_width  # a stepper that cannot grow opens with, and keeps, batch_size rows
        self.batch_size = engine.batch_size
        self.trace_steps = engine.trace_steps
        self.think_end = list(engine.loaded.think_end_ids)
        self.tokenizer = engine.loaded.tokenizer
        self.run = run
        self.waiting: deque[LiveSequence] = deque()
        self.held: list[LiveSequence | None] = []  # the sequence each row of the current stepper decodes
        self.admitted = 0  # sequences given a row so far (their admission order)
        self.step_index = 0  # decode steps of the current stepper

    # --- decisions ---------------------------------------------------------------------------------
    def rows_to_open(self) -> int:
        """Rows of a new stepper: as many as there are requests waiting, up to the batch size (full width: the batch
        size, when anything waits)."""
        if self.full_width and self.waiting:
            return self.batch_size
        return min(self.batch_size, len(self.waiting))

    def open(self, rows: int) -> None:
        self.held = [None] * rows
        self.step_index = 0

    def rows_to_grow(self, can_grow: bool) -> int:
        """Rows to add to a running stepper that can grow, so that waiting requests need not wait for a row."""
        if self.batching != "continuous" or not can_grow or not self.waiting:
            return 0
        free = sum(seq is None for seq in self.held)
        return max(0, min(len(self.waiting) - free, self.batch_size - len(self.held)))

    def end_rows(self) -> list[int]:
        """Rows whose sequences have ended (finished or aborted): they are free from now on."""
        ending = [row for row, seq in enumerate(self.held) if seq is not None and seq.finished]
        for row in ending:
            self.held[row] = None
        return ending

    def assign(self, refill: bool) -> list[tuple[int, LiveSequence]]:
        """Waiting requests given the free rows, lowest row first (only into a new stepper unless refilling)."""
        placed = []
        if not refill:
            return placed
        for row, seq in enumerate(self.held):
            if seq is None and self.waiting:
                nxt = self.waiting.popleft()
                nxt.index = self.admitted
                self.admitted += 1
                self.held[row] = nxt
                placed.append((row, nxt))
        return placed

    def live_rows(self) -> list[int]:
        return [row for row, seq in enumerate(self.held) if seq is not None]

    def rows_to_keep(self, in_buckets: bool, can_grow: bool) -> list[int] | None:
        """With nothing waiting, the live rows to keep (the rest are released), or None to keep every row: at once,
        or in buckets (when the live rows fall to half) for a stepper whose shapes are captured; never, at full
        width, for a stepper that cannot grow back."""
        live = self.live_rows()
        if (self.waiting and self.batching == "continuous") or len(live) == len(self.held):
            return None
        if self.full_width and not can_grow and self.batching == "continuous":
            return None
        if not in_buckets or len(live) <= len(self.held) // 2:  # static batching alike: no capture per finished row
            return live
        return None

    def keep(self, rows: list[int]) -> None:
        self.held = [self.held[row] for row in rows]

    def to_compact(self, lengths: list[int]) -> list[int]:
        """The compression trigger: rows whose cache holds their budget's B tokens."""
        return [
            row for row, (seq, n) in enumerate(zip(self.held, lengths)) if seq is not None and seq.budget.reached(n)
        ]

    def log(self, fed: list[int], lengths: list[int], compressed: list[int], marks: Sequence[TimingMark]) -> StepLog:
        log = StepLog(self.step_index, list(self.held), fed, lengths, set(compressed), marks)
        self.step_index += 1
        return log

    # --- what the stepper learnt ---------------------------------------------------------------------
    def update(self, poll: Poll, bytes_per_token) -> list[LiveSequence]:
        """Append the learnt tokens (up to each sequence's stop), book the settled steps; the sequences that
        ended, in the order they did. bytes_per_token: the stepper's (called only when a trace needs it)."""
        ended = []
        run = self.run
        for seq, tokens in poll.tokens:
            if seq.finished:
                continue
            for token in tokens:
                seq.generated.append(token)
                if self.think_end and seq.generated[-len(self.think_end) :] == self.think_end:
                    seq.in_answer = True
                reason = stop_reason(token, len(seq.generated), seq.eos, seq.limit, seq.stops)
                if reason:
                    seq.stats.finish_reason = reason
                    ended.append(seq)
                    break
        run.decode_time_s += poll.wall_s
        per_token = bytes_per_token() if self.trace_steps and poll.settled else 0
        for log, step_time, forward_time in poll.settled:
            counted = [
                r
                for r, seq in enumerate(log.sequences)
                if seq is not None and (log.fed[r] < len(seq.generated) - 1 or not seq.finished)
            ]
            if not counted:
                run.forward_time_s += forward_time
                continue
            total_kv = account_step(
                run,
                [log.sequences[r].stats for r in counted],
                [log.lengths[r] for r in counted],
                [r in log.compressed for r in counted],
                step_time,
                forward_time,
                [log.sequences[r].budget for r in counted],
            )
            if self.trace_steps:
                compressed = [log.sequences[r].index for r in counted if r in log.compressed]
                run.steps.append(
                    step_record(log.index, len(counted), step_time, forward_time, total_kv, per_token, compressed)
                )
        return ended

    def result(self, seq: LiveSequence, bytes_per_token: int) -> GenerationResult:
        """A sequence's result, booked into the run's figures."""
        run, stats = self.run, seq.stats
        stats.generated_tokens = len(seq.generated)
        stats.peak_kv_bytes = stats.peak_kv_tokens * bytes_per_token
        stats.finalize()
        run.sequences += 1
        run.generated_tokens += stats.generated_tokens
        run.compressions += stats.compressions
        run.evicted_tokens += stats.evicted_tokens
        run.peak_kv_bytes = max(run.peak_kv_bytes, run.peak_kv_tokens * bytes_per_token)
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        return GenerationResult(
            text=text, token_ids=seq.generated, prompt_tokens=len(seq.request.prompt_ids), stats=stats
        )
