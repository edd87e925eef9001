"""One scheduler for both decode paths: requests in, rows kept busy, each result out the moment it ends.

A batch has up to `batch_size` rows; a row decodes one sequence at a time. With continuous batching, when a
row's sequence ends and requests are waiting, the next request is prefilled into that row (its slots, positions
and policy state reset) and joins the next decode step. A fixed KV budget makes this free of memory planning:
every row holds at most B tokens whichever sequence it decodes. When no request waits, finished rows are
released: at once by a stepper whose step costs what its rows cost (the eager engine), in buckets (when the live
rows fall to half) by one that captures a CUDA graph per row count (the static fast path).
`batching="static"` is the old behaviour: requests are taken `batch_size` at a time and a batch runs until its
last sequence ends (its finished rows released by the same rule).

What is shared by both paths lives here: the stop rule (stopping.py), the compression trigger
(BudgetConfig.reached), the statistics (stats.py). A stepper (engine.eager_step.EagerStepper,
fast.static_stepper.StaticStepper) does the device work and tells the scheduler which tokens it has learnt; the
static path learns them a chunk late, so the scheduler books a step only once the tokens of that step are known.

A stepper has: `cache`; `reports_at_once` (tokens are known right after they are chosen) and
`release_in_buckets`; admit(row, seq) (reset the row, prefill, choose the first token); step(held) -> (marks,
token index each row feeds); lengths(); compact(rows); record(StepLog); poll() -> Poll; idle(row) (a row left
without a sequence); release(live rows); flush() -> wall seconds not yet booked; bytes_per_token(); close(); and,
for a stepper that learns tokens late, finishing(held) (no step needed: every sequence is at its last token).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dynts.engine.requests import Request
from dynts.engine.stats import GenerationResult, RunStats, SequenceStats, account_step, step_record
from dynts.engine.stopping import stop_reason
from dynts.errors import DynTSError

BATCHING = ("continuous", "static")


@dataclass(eq=False)
class LiveSequence:
    """A request being decoded: its tokens so far and its figures."""

    request: Request
    index: int  # admission order within the run
    limit: int  # tokens it may generate
    stats: SequenceStats
    generated: list[int] = field(default_factory=list)
    in_answer: bool = False  # it has generated its end-of-thinking marker
    generator: Any = None  # the eager sampler's RNG

    @property
    def finished(self) -> bool:
        return bool(self.stats.finish_reason)


@dataclass
class StepLog:
    """What the host knows about one decode step when it runs: which sequence each row held, which token index
    it fed, the cache lengths after the step (before compaction) and the rows compacted after it."""

    index: int
    sequences: list[LiveSequence | None]
    fed: list[int]
    lengths: list[int]
    compressed: set[int]
    marks: Any = None


@dataclass
class Poll:
    """What a stepper has learnt since the last poll: new tokens per row (for the sequence the row held when they
    were produced), the steps whose timings are known (step time, forward time), and wall time to book."""

    tokens: list[tuple[LiveSequence, list[int]]] = field(default_factory=list)
    settled: list[tuple[StepLog, float, float]] = field(default_factory=list)
    wall_s: float = 0.0


class Scheduler:
    """Runs requests through a stepper; see the module docstring."""

    def __init__(self, engine, make_stepper, batching: str = "continuous"):
        if batching not in BATCHING:
            raise DynTSError(f"--batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.engine = engine
        self.make_stepper = make_stepper  # (rows, capacity) -> stepper
        self.batching = batching
        loaded, sampling = engine.loaded, engine.sampling
        self.eos = frozenset() if sampling.ignore_eos else frozenset(loaded.eos_token_ids)
        self.think_end = list(loaded.think_end_ids)
        self.stepper = None

    def run(self, requests: Iterable[Request], run: RunStats) -> Iterator[tuple[Request, GenerationResult]]:
        """Yield (request, result) for every request, in the order the sequences end."""
        engine = self.engine
        budget = engine.budget
        if not budget.compresses:  # the cache must fit the longest request: look at all of them first
            requests = list(requests)
            if not requests:
                return
            capacity = max(len(r.prompt_ids) + self._limit(r) for r in requests)
        else:
            capacity = budget.budget
        queue = iter(requests)
        counter = itertools.count()
        if self.batching == "static":
            while True:
                batch = list(itertools.islice(queue, engine.batch_size))
                if not batch:
                    return
                yield from self._decode(iter(batch), len(batch), capacity, run, counter, refill=False)
        else:
            first = list(itertools.islice(queue, engine.batch_size))
            if first:
                yield from self._decode(itertools.chain(first, queue), len(first), capacity, run, counter, True)

    # --- one stream of requests through one set of rows ----------------------------------------------------
    def _decode(self, queue: Iterator[Request], rows: int, capacity: int, run: RunStats, counter, refill: bool):
        engine = self.engine
        engine.last_cache = None  # the last run's cache goes before this one is allocated, not after
        stepper = self.make_stepper(rows, capacity)
        self.stepper = stepper
        engine.last_cache = stepper.cache
        held: list[LiveSequence | None] = [self._admit(stepper, row, next(queue), counter, run) for row in range(rows)]
        waiting = refill  # whether more requests may come
        step = 0
        try:
            while True:
                ended = self._take(stepper.poll(), run)
                admitted = False
                for seq in ended:
                    yield seq.request, self._result(seq, run, stepper)
                ending = [row for row, seq in enumerate(held) if seq is not None and seq.finished]
                freed = []
                for row in ending:
                    held[row] = None
                    nxt = next(queue, None) if waiting else None
                    if nxt is None:
                        waiting = False
                        freed.append(row)
                    else:
                        held[row] = self._admit(stepper, row, nxt, counter, run)
                        admitted = True
                if admitted and stepper.reports_at_once:
                    continue  # a first token may already end its sequence
                live = [row for row, seq in enumerate(held) if seq is not None]
                if not live:
                    run.decode_time_s += stepper.flush()
                    if len(ending) < len(held):  # the cache keeps the rows of the last sequences, for inspection
                        stepper.release(ending)
                    return
                for row in freed:
                    stepper.idle(row)
                if not waiting and len(live) < len(held) and self._release_now(stepper, len(live), len(held)):
                    stepper.release(live)
                    held = [held[row] for row in live]
                if not stepper.reports_at_once and stepper.finishing(held):
                    continue  # every sequence chose its last token: learn how they ended before stepping on
                marks, fed = stepper.step(held)
                lengths = stepper.lengths()
                full = [
                    row for row, length in enumerate(lengths) if held[row] is not None and engine.budget.reached(length)
                ]
                if full:
                    stepper.compact(full)
                stepper.record(StepLog(step, list(held), fed, lengths, set(full), marks))
                step += 1
                if engine.on_step is not None:
                    engine.on_step(len(live))
        finally:
            stepper.close()

    def _release_now(self, stepper, live: int, rows: int) -> bool:
        """Finished rows leave at once where a step costs what its rows cost; a stepper that captures a step per row
        count releases them in buckets, when the live rows fall to half (static batching alike)."""
        return not stepper.release_in_buckets or live <= rows // 2

    def _limit(self, request: Request) -> int:
        return len(request.forced) if request.forced is not None else self.engine.sampling.max_new_tokens

    def _admit(self, stepper, row: int, request: Request, counter, run: RunStats) -> LiveSequence:
        self.engine.check_prompts([request.prompt_ids])
        seq = LiveSequence(request, next(counter), self._limit(request), SequenceStats(len(request.prompt_ids)))
        start = time.perf_counter()
        stepper.admit(row, seq)
        seq.stats.prefill_time_s = time.perf_counter() - start
        seq.stats.peak_kv_tokens = len(request.prompt_ids)
        run.prefill_time_s += seq.stats.prefill_time_s
        return seq

    def _take(self, poll: Poll, run: RunStats) -> list[LiveSequence]:
        """Append the learnt tokens (up to each sequence's stop), book the settled steps; the sequences that
        ended, in the order they did."""
        ended = []
        for seq, tokens in poll.tokens:
            if seq.finished:
                continue
            for token in tokens:
                seq.generated.append(token)
                if self.think_end and seq.generated[-len(self.think_end) :] == self.think_end:
                    seq.in_answer = True
                eos = self.eos if seq.request.forced is None else frozenset()  # forced: the tokens given, all
                reason = stop_reason(token, len(seq.generated), eos, seq.limit)
                if reason:
                    seq.stats.finish_reason = reason
                    ended.append(seq)
                    break
        run.decode_time_s += poll.wall_s
        budget = self.engine.budget
        bytes_per_token = self.stepper.bytes_per_token() if self.engine.trace_steps and poll.settled else 0
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
                budget.budget,
            )
            if self.engine.trace_steps:
                compressed = [log.sequences[r].index for r in counted if r in log.compressed]
                run.steps.append(
                    step_record(
                        log.index,
                        len(counted),
                        step_time,
                        forward_time,
                        total_kv,
                        bytes_per_token,
                        compressed,
                    )
                )
        return ended

    def _result(self, seq: LiveSequence, run: RunStats, stepper) -> GenerationResult:
        stats = seq.stats
        stats.generated_tokens = len(seq.generated)
        bytes_per_token = stepper.bytes_per_token()
        stats.peak_kv_bytes = stats.peak_kv_tokens * bytes_per_token
        stats.finalize()
        run.sequences += 1
        run.generated_tokens += stats.generated_tokens
        run.compressions += stats.compressions
        run.peak_kv_bytes = max(run.peak_kv_bytes, run.peak_kv_tokens * bytes_per_token)
        text = self.engine.loaded.tokenizer.decode(seq.generated, skip_special_tokens=True)
        return GenerationResult(
            text=text, token_ids=seq.generated, prompt_tokens=len(seq.request.prompt_ids), stats=stats
        )
