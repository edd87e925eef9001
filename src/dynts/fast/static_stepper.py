"""The static fast path's side of the scheduler: fixed-shape steps, refills in place, tokens read a chunk late.

Every row of the batch runs every step (the step has one shape, rows x capacity, and on CUDA is a replayed
graph). A request admitted into a row is prefilled there and its state written into the step's device tensors in
place, so nothing is captured again. Every `check_every` steps the host starts a copy of the chunk's tokens to
pinned memory without waiting for it, and acts on the previous chunk's tokens, long since copied: the GPU never
waits on the host. A row whose sequence ended meanwhile decodes a little garbage, which is never read as tokens;
a row left without a sequence is kept short until the scheduler releases it, in place and in buckets.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import deque
from dataclasses import dataclass

import torch

from dynts.engine.stepper import LiveSequence, Poll, StepLog, TimingMark
from dynts.fast.attention import check_kernel, static_attention
from dynts.fast.profile import StageClock
from dynts.fast.static_cache import StaticBudgetedCache
from dynts.fast.step import DecodeState, StaticStep, device_index
from dynts.models.shapes import head_dim as attention_head_dim


@dataclass
class _Read:
    """A chunk of tokens on its way to the host, and what the host knew when it asked for it."""

    held: list[LiveSequence | None]  # the sequence each row held during the chunk
    admitted: dict[int, int]  # rows whose column 0 holds the token chosen at their admission -> the chunk's steps
    # run before it (an admission between reads, e.g. into an aborted row: the columns before are the old sequence's)
    logs: list[StepLog]
    host: torch.Tensor  # [rows, 1 + C] (pinned on a GPU)
    event: object
    wall_s: float


class StaticStepper:
    """The static fast path's Stepper (engine/stepper.py): its rows are fixed when it is built (it never grows)."""

    reports_at_once = False
    release_in_buckets = True
    can_grow = False

    def __init__(self, engine, rows: int, capacity: int):
        self.engine = engine
        self.device = engine.device
        self.profile = engine.last_profile
        fast = engine.fast
        self.chunk = max(1, min(fast.check_every, capacity // 2))
        slack = 0 if engine.budget.compresses else 2 * self.chunk + 2  # rows run a chunk or two past their end
        config = engine.loaded.model.config
        head_dim = attention_head_dim(config)
        think_end = tuple(engine.loaded.think_end_ids)
        with self._on_device():
            kernel = self._checked_kernel(rows, config, head_dim, capacity + slack)  # before the cache takes memory
            self.cache = engine.new_cache(rows, capacity + slack, StaticBudgetedCache)
            self.cache.preallocate(config.num_key_value_heads, head_dim, engine.loaded.dtype)
            state = DecodeState.empty(rows, self.device, self.chunk, max(1, len(think_end)))
            self.static_step = StaticStep(
                engine.decoder,
                engine.decode_head(),
                engine.policy,
                self.cache,
                state,
                engine.sampling,
                kernel,
                think_end,
                graphs=fast.graphs,
                warmup_steps=fast.warmup_steps,
                sync_check=fast.sync_check,
                compiled=engine.compiled_forward(),
                fused=engine.fused_decoder(),
                capture_check=fast.capture_check,
            )
        self._compile_before = engine.compile_totals()
        self._attention = static_attention(engine.loaded.model)
        self._attention.__enter__()
        self.clock = StageClock(self.device)
        self.counts = [0] * rows  # the token index each row feeds next
        self.admitted: dict[int, int] = {}
        self.idle_rows: set[int] = set()
        self.logs: list[StepLog] = []
        self.reads: deque[_Read] = deque()
        self.read_started = time.perf_counter()
        self._marks: list[TimingMark] = []
        self._draining = False  # every row reached its last token: read what is there now
        self.stepped = False  # a decode step has been launched

    def _on_device(self):
        """Every stream, event, capture and launch happens on the engine's GPU, whatever the current one is."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _checked_kernel(self, rows, config, head_dim, capacity) -> str:
        """The engine's kernel if it passed its check against SDPA (once per engine, at its first use's real shapes
        and dtype), else sdpa, with one warning naming the cause."""
        kernel, engine = self.engine.fast.kernel, self.engine
        key = kernel  # checked once per engine, at the shapes of its first use
        first = key not in engine.kernel_checked
        if first:
            engine.kernel_checked[key] = check_kernel(
                kernel,
                rows,
                config.num_attention_heads,
                config.num_key_value_heads,
                head_dim,
                capacity,
                engine.loaded.dtype,
                self.device,
            )
        reason = engine.kernel_checked[key]
        if reason is None:
            return kernel
        message = f"decode attention kernel {kernel!r} failed its check against SDPA ({reason}); using sdpa"
        if first:
            warnings.warn(message, stacklevel=2)
        self.profile.fallbacks.append(message)
        self.profile.kernel = "sdpa"
        return "sdpa"

    # --- rows ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, row: int, seq: LiveSequence) -> None:
        engine, cache = self.engine, self.cache
        with self._on_device():
            cache.reset_row(row)
            hidden = engine.feed(cache, row, seq.request.prompt_ids, is_prompt=True)
            logits = engine.lm_head(hidden[:, -1])
            cache.plan_static_decode(self.static_step.state.lengths)  # the prefill planned its own forward
            self.static_step.admit_row(row, logits, seq.seed, cache.lengths[row], cache.next_position[row], seq.params)
            if not self.stepped:  # the first rows' prefill is timed; a refill never waits for the queued steps
                engine.synchronize()
        self.counts[row] = 0
        self.admitted[row] = len(self.logs)
        self.idle_rows.discard(row)
        self._draining = False

    def idle(self, row: int) -> None:
        """A row left without a sequence: it runs on with the batch until released, restarting from slot 0 now
        and at every read, so it never outgrows the cache (it is never compacted)."""
        self.idle_rows.add(row)
        self._restart_idle([row])

    def _restart_idle(self, rows: list[int]) -> None:
        with self._on_device():
            self.static_step.idle_rows(device_index(rows, self.device))
        for row in rows:
            self.cache.lengths[row] = self.cache.next_position[row] = 0

    def release(self, live: list[int]) -> None:
        with self._on_device():
            self.static_step.keep_rows(live)
        new = {old: i for i, old in enumerate(live)}
        self.counts = [self.counts[r] for r in live]
        self.admitted = {new[r]: at for r, at in self.admitted.items() if r in new}
        self.idle_rows = {new[r] for r in self.idle_rows if r in new}

    # --- one step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, held: list[LiveSequence | None]) -> tuple[list[TimingMark], list[int]]:
        with self._on_device():
            self._marks = self.static_step.run(self.clock.mark)
        self.stepped = True
        self.cache.advance()
        fed = list(self.counts)
        self.counts = [c + 1 for c in self.counts]
        return self._marks, fed

    def lengths(self) -> list[int]:
        return list(self.cache.lengths)

    @torch.no_grad()
    def compact(self, rows: list[int], budgets) -> None:
        """Rows at the same budget are compacted together (they hold the same number of tokens)."""
        groups: dict = {}
        for row, budget in zip(rows, budgets):
            groups.setdefault(budget, []).append(row)
        with self._on_device():
            for budget, group in groups.items():
                self.static_step.compact(group, None if budget is self.engine.budget else budget)
            self._marks.append(self.clock.mark())

    def record(self, log: StepLog) -> None:
        self.logs.append(log)
        if len(self.logs) >= self.chunk:
            self._launch_read(log.sequences)

    def _launch_read(self, held: list[LiveSequence | None]) -> None:
        with self._on_device():
            chunk = self.static_step.state.chunk
            if self.device.type == "cuda":
                host = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
                host.copy_(chunk, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = chunk.clone(), None
            # after the copy, in stream order: the next chunk starts at column 1
            self.static_step.state.chunk_step.zero_()
            if self.idle_rows:
                self._restart_idle(sorted(self.idle_rows))
        now = time.perf_counter()
        self.reads.append(_Read(list(held), dict(self.admitted), self.logs, host, event, now - self.read_started))
        self.read_started = now
        self.admitted, self.logs = {}, []
        self.profile.host_reads += 1

    def finishing(self, held: list[LiveSequence | None]) -> bool:
        """When every row's sequence has chosen the last token it may (max_new_tokens), no step is needed to know
        how they end: start a read of what is there now and let the next poll take every chunk at once."""
        if any(seq is not None and self.counts[r] < seq.limit - 1 for r, seq in enumerate(held)):
            return False
        if self.logs or self.admitted:
            self._launch_read(held)
        self._draining = True
        return True

    # --- what the scheduler learns ------------------------------------------------------------------
    def poll(self) -> Poll:
        """The tokens and timings of the oldest chunk, once the next one has been started (one chunk late); every
        chunk when finishing."""
        poll = Poll()
        while len(self.reads) >= 2 or (self._draining and self.reads):
            read = self.reads.popleft()
            if read.event is not None:
                read.event.synchronize()
            rows = read.host.tolist()
            steps = len(read.logs)
            poll.tokens += [
                (
                    seq,
                    [rows[r][0], *rows[r][1 + read.admitted[r] : 1 + steps]]
                    if r in read.admitted
                    else rows[r][1 : 1 + steps],
                )
                for r, seq in enumerate(read.held)
                if seq is not None
            ]
            poll.settled += self._settle(read)
            poll.wall_s += read.wall_s
        return poll

    def _settle(self, read: _Read) -> list[tuple[StepLog, float, float]]:
        """Stage times of the chunk's steps (CUDA events on a GPU); the chunk's wall clock is split over its steps
        in proportion to their device time."""
        profile, clock = self.profile, self.clock
        stages = [[clock.seconds(a, b) for a, b in zip(log.marks, log.marks[1:])] for log in read.logs]
        for s in stages:
            profile.forward_s += s[0]
            profile.scoring_s += s[1]
            profile.sampling_s += s[2]
            profile.eviction_s += s[3] if len(s) > 3 else 0.0
        device_total = sum(sum(s) for s in stages)
        profile.wall_s += read.wall_s
        profile.steps += len(read.logs)
        return [
            (log, read.wall_s * sum(s) / device_total if device_total > 0 else 0.0, s[0])
            for log, s in zip(read.logs, stages)
        ]

    def flush(self) -> float:
        """Wall time of the chunks never read (their tokens belong to sequences already ended)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = sum(r.wall_s for r in self.reads) + time.perf_counter() - self.read_started
        self.reads.clear()
        self.profile.wall_s += wall
        return wall

    def bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def close(self) -> None:
        self.profile.capture_s += self.static_step.capture_s
        self.profile.captures += self.static_step.captures
        self.profile.graphs = bool(self.static_step.graphs)
        active, compile_s, compiles = self.engine.compile_totals()
        self.profile.compiled = active
        self.profile.compile_s += compile_s - self._compile_before[1]
        self.profile.compiles += compiles - self._compile_before[2]
        self.profile.fused = self.static_step.fused is not None
        self.profile.packed = self.profile.fused and self.engine.packed_bytes > 0
        self._attention.__exit__(None, None, None)
