"""The fast decode path: the budgeted engine with static shapes, CUDA graphs and no per-step host sync.

A fixed budget means fixed memory, so a batch's decode step has one shape from start to end (rows x budget).
FastEngine prefills like the eager Engine, then runs StaticStep (static_step.py): on CUDA its stages are
captured as CUDA graphs after two warm-up steps and replayed. The host never reads the device in the steady
state: it knows every row's length (one more per step; a compaction sets W + floor(r (B - W))), so it knows
which rows compress at which step and launches their compaction without asking. It reads the generated
tokens only every `check_every` steps (and when rows reach max_new_tokens) to find EOS; rows that stopped in
between keep decoding harmlessly until then and their extra tokens are dropped. Finished rows leave the
batch at a check, as in the eager engine, and the graphs are captured again for the smaller shape.

Greedy output equals the eager Engine's (tests/test_fast_engine.py). Sampling draws from the same
distribution with counter-based noise (static_sampling.py), so sampled texts differ from the eager engine's.
Teacher forcing and logits callbacks (`forced`, `on_logits`) and policies other than the built-in ones run
on the eager path, with a warning saying so.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.engine.stats import GenerationResult, RunStats, SequenceStats, account_step, step_record
from dynts.engine.stopping import stop_reason
from dynts.errors import DynTSError
from dynts.fast.attention import KERNELS, resolve_kernel, static_attention
from dynts.fast.static_cache import StaticBudgetedCache
from dynts.fast.step import DecodeState, StaticStep
from dynts.models.loading import LoadedModel


@dataclass(frozen=True)
class FastConfig:
    """How the fast path runs; None / "auto" fields take the device's default (see `for_device`).

    graphs: capture the step as CUDA graphs (CUDA only; default on there).
    kernel: decode attention, one of decode_attention.KERNELS.
    check_every: decode steps between host reads of the generated tokens (EOS checks): 16 on CUDA, 1 elsewhere.
    compile: torch.compile the forward stage before capture (experimental).
    sync_check: raise HostSyncError on any host sync inside a step or a compaction (debugging, tests).
    warmup_steps: eager steps before a capture.
    """

    graphs: bool | None = None
    kernel: str = "auto"
    check_every: int | None = None
    compile: bool = False
    sync_check: bool = False
    warmup_steps: int = 2

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise DynTSError(f"unknown decode attention kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        if self.check_every is not None and self.check_every < 1:
            raise DynTSError(f"check_every must be at least 1, got {self.check_every}")
        if self.warmup_steps < 1:
            raise DynTSError(f"warmup_steps must be at least 1, got {self.warmup_steps}")

    def for_device(self, device: torch.device, dtype: torch.dtype) -> FastConfig:
        cuda = device.type == "cuda"
        if self.graphs and not cuda:
            raise DynTSError("CUDA graphs need a CUDA device")
        return replace(
            self,
            graphs=cuda if self.graphs is None else self.graphs,
            kernel=resolve_kernel(self.kernel, device, dtype),
            check_every=self.check_every or (16 if cuda else 1),
        )


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
    host_reads: int = 0
    kernel: str = ""
    graphs: bool = False
    check_every: int = 1

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


@dataclass
class _PendingStep:
    """A step whose timing and per-sequence accounting wait for the next host read."""

    index: int
    sequences: list[int]  # sequence held by each row at this step
    lengths: list[int]  # cache lengths after the step, before compaction
    compressed_rows: list[int]
    marks: list


class FastEngine(Engine):
    """Engine with the static fast decode path (see the module docstring); same constructor plus `fast`."""

    def __init__(
        self,
        loaded: LoadedModel,
        policy="full",
        budget: BudgetConfig | None = None,
        sampling: SamplingConfig | None = None,
        batch_size: int = 8,
        head=None,
        head_path=None,
        trace_steps: bool = False,
        on_step=None,
        fast: FastConfig | None = None,
        policy_options=None,
    ):
        super().__init__(
            loaded,
            policy,
            budget,
            sampling,
            batch_size,
            head=head,
            head_path=head_path,
            trace_steps=trace_steps,
            on_step=on_step,
            policy_options=policy_options,
        )
        self.fast = (fast or FastConfig()).for_device(self.device, loaded.dtype)
        self.fallback_reason: str | None = None
        if not self.policy.is_capturable():
            self.fallback_reason = (
                f"policy {self.policy.name!r} ({type(self.policy).__name__}) is not known to be capturable"
            )
        self.last_profile: DecodeProfile | None = None
        self._warned = False

    def generate(self, *args, **kwargs):
        self.last_profile = DecodeProfile(
            kernel=self.fast.kernel, graphs=bool(self.fast.graphs), check_every=self.fast.check_every
        )
        return super().generate(*args, **kwargs)

    def _generate_batch(self, prompts, seeds, run, forced=None, on_logits=None):
        reason = (
            self.fallback_reason
            or ("teacher forcing" if forced is not None else None)
            or ("a logits callback" if on_logits is not None else None)
        )
        if reason is not None:
            if not self._warned:
                warnings.warn(f"fast decode path off for {reason}: using the eager engine", stacklevel=3)
                self._warned = True
            return super()._generate_batch(prompts, seeds, run, forced=forced, on_logits=on_logits)
        with static_attention(self.loaded.model):
            return self._fast_batch(prompts, seeds, run)

    # --- the decode loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def _fast_batch(self, prompts: list[list[int]], seeds: list[int], run: RunStats) -> list[GenerationResult]:
        n = len(prompts)
        policy, budget, sampling, fast = self.policy, self.budget, self.sampling, self.fast
        limit = sampling.max_new_tokens
        config = self.loaded.model.config
        capacity = budget.budget if budget.compresses else max(len(p) for p in prompts) + limit
        cache = self.new_cache(n, capacity, StaticBudgetedCache)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache.preallocate(config.num_key_value_heads, head_dim, self.loaded.dtype)
        self.last_cache = cache
        stats = [SequenceStats(prompt_tokens=len(p)) for p in prompts]
        logits = self._prefill(cache, prompts, stats)
        run.prefill_time_s += sum(s.prefill_time_s for s in stats)
        bytes_per_token = cache.bytes_per_token()

        step = StaticStep(
            self.decoder,
            self.lm_head,
            policy,
            cache,
            DecodeState.start(cache, seeds, limit),
            sampling,
            fast.kernel,
            tuple(self.loaded.think_end_ids),
            graphs=fast.graphs,
            warmup_steps=fast.warmup_steps,
            sync_check=fast.sync_check,
            compile_forward=fast.compile,
        )
        step.first_tokens(logits)
        eos = set() if sampling.ignore_eos else set(self.loaded.eos_token_ids)
        profile, clock = self.last_profile, StageClock(self.device)
        generated: list[list[int]] = [[] for _ in range(n)]
        active = list(range(n))  # sequence held by each row
        pending: list[_PendingStep] = []
        produced, read, index = 1, 0, 0  # tokens per row in the history, tokens read by the host, steps run
        chunk_start = time.perf_counter()
        while True:
            if produced - read >= fast.check_every or produced >= limit:
                tokens = step.state.history[:, read:produced].tolist()  # the one host read of this chunk
                read = produced
                profile.host_reads += 1
                stopped = self._take_tokens(tokens, active, generated, stats, eos, limit)
                now = time.perf_counter()
                self._settle(pending, generated, stats, run, now - chunk_start, clock, bytes_per_token)
                pending, chunk_start = [], now
                if len(stopped) == len(active):
                    break
                if stopped:
                    keep = [r for r in range(len(active)) if r not in stopped]
                    step.shrink(keep)
                    active = [active[r] for r in keep]

            marks = step.run(clock.mark)
            cache.advance()
            produced += 1
            full = [r for r, length in enumerate(cache.lengths) if budget.reached(length)]
            lengths = list(cache.lengths)
            if full:
                step.compact(full)
                marks.append(clock.mark())
            pending.append(_PendingStep(index, list(active), lengths, full, marks))
            index += 1
            if self.on_step is not None:
                self.on_step(len(active))

        profile.capture_s += step.capture_s
        profile.captures += step.captures
        return self._finish_batch(prompts, generated, stats, run, bytes_per_token)

    @staticmethod
    def _take_tokens(tokens, active, generated, stats, eos, limit) -> set[int]:
        """Append each row's newly read tokens up to its stop; returns the rows that stopped."""
        stopped = set()
        for row, seq in enumerate(active):
            for token in tokens[row]:
                generated[seq].append(token)
                reason = stop_reason(token, len(generated[seq]), eos, limit)
                if reason:
                    stats[seq].finish_reason = reason
                    stopped.add(row)
                    break
        return stopped

    def _settle(
        self,
        pending: list[_PendingStep],
        generated,
        stats,
        run: RunStats,
        wall_s: float,
        clock: StageClock,
        bytes_per_token: int,
    ) -> None:
        """Turn the steps since the last read into timings and per-sequence figures, as the eager engine keeps them.

        Step s fed token s of every row, so it counts for a sequence that ended with c tokens only if s < c - 1;
        steps run for rows that had already stopped cost wall time but belong to no sequence."""
        profile, budget = self.last_profile, self.budget
        durations = []
        for p in pending:
            stages = [clock.seconds(a, b) for a, b in zip(p.marks, p.marks[1:])]
            durations.append(stages)
            profile.forward_s += stages[0]
            profile.scoring_s += stages[1]
            profile.sampling_s += stages[2]
            profile.eviction_s += stages[3] if len(stages) > 3 else 0.0
        device_total = sum(sum(d) for d in durations)
        profile.wall_s += wall_s
        profile.steps += len(pending)
        run.decode_time_s += wall_s
        for p, stages in zip(pending, durations):
            step_time = wall_s * sum(stages) / device_total if device_total > 0 else 0.0
            rows = [
                r
                for r, seq in enumerate(p.sequences)
                if p.index < len(generated[seq]) - 1 or not stats[seq].finish_reason
            ]
            if not rows:
                run.forward_time_s += stages[0]
                continue
            total_kv = account_step(
                run,
                [stats[p.sequences[r]] for r in rows],
                [p.lengths[r] for r in rows],
                [r in p.compressed_rows for r in rows],
                step_time,
                stages[0],
                budget.budget,
            )
            if self.trace_steps:
                compressed = [p.sequences[r] for r in rows if r in p.compressed_rows]
                run.steps.append(
                    step_record(p.index, len(rows), step_time, stages[0], total_kv, bytes_per_token, compressed)
                )
