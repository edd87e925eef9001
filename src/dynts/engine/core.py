"""The engine core: requests in at any time, one scheduler iteration per step(), outputs out as tokens are learnt.

The shape of vLLM v1's EngineCore: each step() takes in what was added or aborted since the last one, updates
the scheduler with what the stepper learnt (new tokens, ended sequences, step timings), lets the scheduler decide
(which rows end, which waiting requests take which rows, which rows to release), has the stepper execute that
(prefill, one decode step, the compactions the trigger asks for), and returns a RequestOutput per request with news.
The scheduler (scheduler.py) decides and books, the stepper (stepper.py) executes; only data passes between them.
`Engine.stream` and `Engine.generate` are loops over a core; a server keeps one core and loops step() in the
thread that owns the model, while other threads call add_request and abort (both thread-safe).

Validation is synchronous: add_request raises a DynTSError (and queues nothing) for a prompt that cannot be
decoded, a per-request budget the policy or the prompt cannot take, or sampling params the stepper cannot honour.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from dynts.config import SamplingParams
from dynts.engine.requests import Request
from dynts.engine.scheduler import Scheduler
from dynts.engine.stats import GenerationResult, RunStats, SequenceStats
from dynts.engine.stepper import LiveSequence
from dynts.errors import DynTSError

__all__ = ["EngineCore", "RequestOutput", "SamplingParams", "finish_reason"]

# Why a sequence ended, as a request's output says it (the sequence's stats keep the finer "eos" / "stop").
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def finish_reason(stats_reason: str) -> str:
    """The OpenAI-style reason of a sequence's stats reason: "stop" (EOS or a stop token), "length", or the abort
    reason as given."""
    return FINISH_REASONS.get(stats_reason, stats_reason)


@dataclass
class RequestOutput:
    """What one step learnt about one request: its new tokens, and when it finished, why and its result."""

    request_id: int
    key: Any
    new_token_ids: list[int]  # tokens learnt since the last output for this request
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS / stop token), "length", "abort" (or the reason given)
    result: GenerationResult | None = None  # when finished: text, token ids, stats


class EngineCore:
    """Takes requests at any time and decodes them with an engine's policy, budget and stepper; see the module
    docstring. capacity: the cache slots per row; a budgeted policy's is its budget B, the full policy's is
    `engine.max_model_len` unless given (a request whose prompt + max_new_tokens exceeds it is refused).

    full_width (the static fast path; the eager stepper grows back its rows either way): its stepper cannot add
    rows, so it opens with all batch_size rows and keeps them while any sequence runs (idle rows restart in
    place): requests that arrive later always find a row, as a server wants. False (stream's way, for work known
    up front): it opens as wide as the requests waiting and releases idle rows in buckets.
    """

    def __init__(
        self,
        engine,
        run: RunStats | None = None,
        capacity: int | None = None,
        on_logits=None,
        full_width: bool = True,
    ):
        self.engine = engine
        self.run = run if run is not None else RunStats()
        wide = full_width and engine.eager_reason(on_logits) is None
        self.scheduler = Scheduler(engine, self.run, engine.batching, wide)
        budget = engine.budget
        self.capacity = budget.budget if budget.compresses else (capacity or engine.max_model_len)
        self.on_logits = on_logits  # eager path only: (keys, token indices, logits, compressions) per choice
        self.default_params = SamplingParams.from_config(engine.sampling)
        self.vocab_size = engine.vocab_size
        self.stepper = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._inbox: deque[LiveSequence] = deque()  # added since the last step
        self._aborts: dict[int, str] = {}  # asked since the last step
        self._unfinished: dict[int, LiveSequence] = {}  # added and not yet finished (waiting or running)
        self._kv_in_use = 0

    # --- taking work --------------------------------------------------------------------------------
    def add_request(self, request: Request) -> int:
        """Validate the request against this engine and queue it; returns its id. Raises a DynTSError (and queues
        nothing) when it cannot be decoded."""
        seq = self.make_sequence(request)
        with self._lock:
            seq.request_id = next(self._ids)
            self._inbox.append(seq)
            self._unfinished[seq.request_id] = seq
        return seq.request_id

    def abort(self, request_id: int, reason: str = "abort") -> bool:
        """Stop a request: its row is freed at the next step() (and refilled like a finished one), which returns
        its output with `reason`. False when the id is unknown or its request has already finished."""
        with self._lock:
            if request_id not in self._unfinished or request_id in self._aborts:
                return False
            self._aborts[request_id] = reason
            return True

    def has_work(self) -> bool:
        """Whether step() has anything to do: requests not finished yet, or a stepper still open."""
        with self._lock:
            return bool(self._unfinished) or self.stepper is not None

    # --- figures (read-only, e.g. for /metrics) --------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    @property
    def num_running(self) -> int:
        """Requests holding a row (prefilled, not yet finished), as of the last step."""
        return sum(seq is not None and not seq.finished for seq in self.scheduler.held)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a row."""
        with self._lock:
            return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def kv_tokens_in_use(self) -> int:
        """Cache slots holding tokens of running requests, as of the last step."""
        return self._kv_in_use

    @property
    def kv_capacity_tokens(self) -> int:
        """Cache slots the core may use at most: batch size x slots per row."""
        return self.batch_size * self.capacity

    # --- validation ---------------------------------------------------------------------------------
    def make_sequence(self, request: Request) -> LiveSequence:
        """The request resolved against the engine (its params, budget frame, seed, limit and stop tokens), or a
        DynTSError saying why it cannot be decoded."""
        engine = self.engine
        if not isinstance(request, Request):
            raise DynTSError(f"add_request takes a Request, got {type(request).__name__}")
        prompt = request.prompt_ids
        self._check_tokens(prompt, "prompt")
        if request.forced is not None:
            self._check_tokens(request.forced, "forced")
            if not engine.takes_forced:
                raise DynTSError(
                    "teacher forcing (forced tokens) runs on the eager path: use generate(forced=...) on this "
                    "engine, or an engine built with fast=False"
                )
        budget = engine.budget if request.budget is None else engine.budget.scaled(request.budget)
        if budget is not engine.budget:
            engine.policy.check_budget(budget)
        budget.check_prompt(len(prompt), engine.policy.protects_prompt)
        params = request.sampling if request.sampling is not None else self.default_params
        if params.sampler_key() != self.default_params.sampler_key():
            engine.check_sampling(params)
        limit = len(request.forced) if request.forced is not None else params.max_new_tokens
        if not budget.compresses and len(prompt) + limit > self.capacity:
            raise DynTSError(
                f"prompt of {len(prompt)} tokens + {limit} new tokens exceeds the cache of {self.capacity} tokens per "
                "row (max_model_len) this engine holds without a budget: shorten the prompt, lower max_new_tokens, "
                "or build the engine with a larger max_model_len"
            )
        forced = request.forced is not None
        return LiveSequence(
            request=request,
            request_id=-1,
            params=params,
            budget=budget,
            seed=int(request.seed) if request.seed is not None else int(params.seed),
            limit=limit,
            eos=frozenset() if forced or params.ignore_eos else frozenset(engine.loaded.eos_token_ids),
            stops=frozenset() if forced else frozenset(params.stop_token_ids),
            stats=SequenceStats(len(prompt)),
        )

    def _check_tokens(self, ids, what: str) -> None:
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise DynTSError(f"{what} holds token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    # --- one iteration --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: take in what was added and aborted, learn what the stepper has learnt, free the
        rows of ended sequences, admit waiting requests into free rows, one decode step (when no admission's first
        token must be learnt first), compactions. Returns an output per request with new tokens or that finished."""
        sch = self.scheduler
        with self._lock:
            sch.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, {}
        ended: list[LiveSequence] = []
        for request_id, reason in aborts.items():  # a waiting request ends without a row
            seq = self._unfinished[request_id]
            if seq in sch.waiting:
                sch.waiting.remove(seq)
                seq.stats.finish_reason = reason
                ended.append(seq)
        touched: list[LiveSequence] = []
        stepper = self.stepper
        if stepper is not None:
            poll = stepper.poll()
            touched = [seq for seq, _ in poll.tokens]
            ended += sch.update(poll, stepper.bytes_per_token)
        for request_id, reason in aborts.items():  # a running one: its row is freed below
            seq = self._unfinished[request_id]
            if not seq.finished:
                seq.stats.finish_reason = reason
                ended.append(seq)
        outputs = self._outputs(touched, ended)
        self._schedule_and_execute()
        self._kv_in_use = self._tokens_in_use()
        return outputs

    def _outputs(self, touched: list[LiveSequence], ended: list[LiveSequence]) -> list[RequestOutput]:
        outputs, seen = [], set()
        bytes_per_token = self.stepper.bytes_per_token() if self.stepper is not None else 0
        for seq in ended:  # in the order the sequences ended
            seen.add(id(seq))
            result = self.scheduler.result(seq, bytes_per_token)
            outputs.append(
                RequestOutput(
                    seq.request_id,
                    seq.request.key,
                    seq.generated[seq.emitted :],
                    True,
                    finish_reason(seq.stats.finish_reason),
                    result,
                )
            )
            seq.emitted = len(seq.generated)
        for seq in touched:
            if id(seq) in seen or seq.finished or seq.emitted == len(seq.generated):
                continue
            seen.add(id(seq))
            outputs.append(RequestOutput(seq.request_id, seq.request.key, seq.generated[seq.emitted :]))
            seq.emitted = len(seq.generated)
        if ended:
            with self._lock:
                for seq in ended:
                    self._unfinished.pop(seq.request_id, None)
        return outputs

    def _schedule_and_execute(self) -> None:
        engine, sch = self.engine, self.scheduler
        opened = False
        if self.stepper is None:
            rows = sch.rows_to_open()
            if not rows:
                return
            engine.last_cache = None  # the last run's cache goes before this one is allocated, not after
            self.stepper = engine.stepper(rows, self.capacity, self.on_logits)
            engine.last_cache = self.stepper.cache
            sch.open(rows)
            opened = True
        stepper = self.stepper
        ending = sch.end_rows()
        grow = sch.rows_to_grow(getattr(stepper, "can_grow", False))
        if grow:
            stepper.grow(grow)
            sch.held += [None] * grow
        placed = sch.assign(refill=opened or sch.batching == "continuous")
        for row, seq in placed:
            self._admit(row, seq)
        if opened:  # a full-width stepper's rows no request took yet idle from the start
            ending = ending + [row for row, seq in enumerate(sch.held) if seq is None]
        if placed and stepper.reports_at_once:
            return  # a first token may already end its sequence: learn it before stepping on
        live = sch.live_rows()
        if not live:
            self.run.decode_time_s += stepper.flush()
            if ending and len(ending) < len(sch.held):  # the cache keeps the rows of the last sequences, to inspect
                stepper.release(ending)
            self.close()
            return
        for row in ending:
            if sch.held[row] is None:
                stepper.idle(row)
        keep = sch.rows_to_keep(stepper.release_in_buckets, getattr(stepper, "can_grow", False))
        if keep is not None:
            stepper.release(keep)
            sch.keep(keep)
        if not stepper.reports_at_once and stepper.finishing(sch.held):
            return  # every sequence chose its last token: learn how they ended before stepping on
        marks, fed = stepper.step(sch.held)
        lengths = stepper.lengths()
        full = sch.to_compact(lengths)
        if full:
            stepper.compact(full, [sch.held[row].budget for row in full])
        stepper.record(sch.log(fed, lengths, full, marks))
        if engine.on_step is not None:
            engine.on_step(len(live))

    def _admit(self, row: int, seq: LiveSequence) -> None:
        start = time.perf_counter()
        self.stepper.admit(row, seq)
        seq.stats.prefill_time_s = time.perf_counter() - start
        seq.stats.peak_kv_tokens = len(seq.request.prompt_ids)
        self.run.prefill_time_s += seq.stats.prefill_time_s

    def _tokens_in_use(self) -> int:
        if self.stepper is None:
            return 0
        lengths = self.stepper.cache.lengths
        return sum(
            lengths[row] for row, seq in enumerate(self.scheduler.held) if seq is not None and row < len(lengths)
        )

    def close(self) -> None:
        """Close the stepper (its cache stays as engine.last_cache); a later request opens a new one."""
        if self.stepper is not None:
            stepper, self.stepper = self.stepper, None
            self.scheduler.held = []
            stepper.close()
