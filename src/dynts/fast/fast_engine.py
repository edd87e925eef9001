"""The fast decode path: the budgeted engine with static shapes, CUDA graphs and no per-step host sync.

A fixed budget means fixed memory, so every decode step has one shape from start to end (rows x budget), and a
row refilled with the next request (continuous batching, engine/scheduler.py) changes no shape at all. FastEngine
prefills like the eager Engine, then runs StaticStep (step.py) through a StaticStepper (static_stepper.py): on
CUDA its stages are captured as CUDA graphs after two warm-up steps and replayed. The host never waits on the
device in the steady state: it knows every row's length (one more per step; a compaction sets W + floor(r (B -
W))), so it launches compactions without asking, and it copies the generated tokens back every `check_every`
steps without blocking, acting on them one chunk later.

Greedy output equals the eager Engine's (tests/test_fast_engine.py). Sampling draws from the same
distribution with counter-based noise (sampling.py), so sampled texts differ from the eager engine's.
Teacher forcing and logits callbacks (`forced`, `on_logits`) and policies not declared capturable run on the
eager path, with a warning saying so. A decode-attention kernel that fails its first check against SDPA, or a
graph capture that raises, leaves the engine on the next safe path with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from dynts.config import BudgetConfig, SamplingConfig, environment_switch
from dynts.engine.engine import Engine
from dynts.engine.sampling import top_k_count
from dynts.errors import DynTSError
from dynts.fast.attention import KERNELS, resolve_kernel
from dynts.fast.compiled_step import CompileConfig, CompiledStage, CompileFailure, compile_from_environment
from dynts.fast.fused_decoder import FUSED_TYPES, FusedDecoder, attention_inputs, layer_output
from dynts.fast.packed_linear import PACKED_ENV, PackedHead, memory_problem, packing_problem
from dynts.fast.profile import DecodeProfile
from dynts.fast.static_stepper import StaticStepper
from dynts.fast.step import StaticStep
from dynts.models.loading import LoadedModel


@dataclass(frozen=True)
class FastConfig:
    """How the fast path runs; None / "auto" fields take the device's default (see `for_device`).

    graphs: capture the step as CUDA graphs (CUDA only; default on there; env DYNTS_GRAPHS=0/1).
    kernel: decode attention, one of attention.KERNELS (env DYNTS_KERNEL when left at "auto").
    check_every: decode steps between host reads of the generated tokens (EOS checks): 16 on CUDA, 1 elsewhere.
    compile: torch.compile the forward stage (compiled_step.py; env DYNTS_COMPILE=0/1), before any capture.
    compile_mode: compiled_step.COMPILE_MODES; compile_backend: a torch.compile backend name (default inductor).
    fused: run the forward stage through our fused decoder (fused_decoder.py) instead of the model's forward; None:
        on for the model types it supports.
    packed: the fused decoder's projections and the LM head multiply by weights packed for oneDNN
        (packed_linear.py: a second copy of the decode weights); None: on where packing runs (CPU, fp32/bf16) and
        the copy fits (env DYNTS_PACKED=0/1). Compiled, the whole forward is then one graph.
    sync_check: raise HostSyncError on any host sync inside a step or a compaction (debugging, tests).
    capture_check: record every tensor the captured step touches and raise CaptureSafetyError at any later step
        where one is gone, moved or reshaped (capture_guard.py; debugging, tests; works without graphs too).
    warmup_steps: eager steps before a capture.
    """

    graphs: bool | None = None
    kernel: str = "auto"
    check_every: int | None = None
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    fused: bool | None = None
    packed: bool | None = None
    sync_check: bool = False
    capture_check: bool = False
    warmup_steps: int = 2

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise DynTSError(f"unknown decode attention kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        if self.check_every is not None and self.check_every < 1:
            raise DynTSError(f"check_every must be at least 1, got {self.check_every}")
        if self.warmup_steps < 1:
            raise DynTSError(f"warmup_steps must be at least 1, got {self.warmup_steps}")
        self.compile_config()

    def compile_config(self) -> CompileConfig:
        return CompileConfig(backend=self.compile_backend, mode=self.compile_mode)

    @classmethod
    def from_environment(cls, **given) -> FastConfig:
        """The config with DYNTS_KERNEL / DYNTS_GRAPHS / DYNTS_COMPILE / DYNTS_PACKED filling what was not given
        (flags win over the environment, the environment over the defaults)."""
        kernel = given.pop("kernel", None) or os.environ.get("DYNTS_KERNEL") or "auto"
        graphs = given.pop("graphs", None)
        if graphs is None:
            graphs = environment_switch("DYNTS_GRAPHS")
        compile_ = compile_from_environment(given.pop("compile", None))
        packed = given.pop("packed", None)
        if packed is None:
            packed = environment_switch(PACKED_ENV)
        return cls(kernel=kernel, graphs=graphs, compile=compile_, packed=packed, **given)

    def for_device(self, device: torch.device, dtype: torch.dtype) -> FastConfig:
        cuda = device.type == "cuda"
        if self.graphs and not cuda:
            raise DynTSError("CUDA graphs need a CUDA device")
        packed = self.packed
        if packed is not False:
            problem = packing_problem(device, dtype)
            if packed and problem:
                raise DynTSError(f"packed projections cannot run: {problem}")
            packed = problem is None
        return replace(
            self,
            graphs=cuda if self.graphs is None else self.graphs,
            kernel=resolve_kernel(self.kernel, device, dtype),
            check_every=self.check_every or (16 if cuda else 1),
            packed=packed,
        )


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
        batching: str = "continuous",
        max_model_len: int | None = None,
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
            batching=batching,
            max_model_len=max_model_len,
        )
        asked = fast or FastConfig.from_environment()
        self.fast = asked.for_device(self.device, loaded.dtype)
        if asked.packed is None and self.fast.packed and memory_problem(loaded.model) is not None:
            self.fast = replace(self.fast, packed=False)  # the default only where the copy fits easily
        self.fallback_reason: str | None = None
        if not self.policy.is_capturable():
            self.fallback_reason = (
                f"policy {self.policy.name!r} ({type(self.policy).__name__}) is not known to be capturable"
            )
        self.last_profile: DecodeProfile | None = None
        self._eager_reason: str | None = None  # set by generate() for teacher forcing / a logits callback
        self.kernel_checked: dict = {}  # kernel -> why it failed its check against SDPA, or None
        self._warned = False
        self.compile_failure = CompileFailure()
        self._compiled: CompiledStage | None = None  # the whole forward stage (the model's forward)
        self._regions: tuple[CompiledStage, ...] = ()  # the fused decoder's two layer regions
        self._fused: FusedDecoder | None = None
        self._decode_head: PackedHead | None = None
        self.packed_bytes = 0  # what the packed copies of the decode weights hold (FastConfig.packed)

    def fused_decoder(self) -> FusedDecoder | None:
        """The fused decoder the static step runs (built once per engine), or None for the model's forward."""
        wanted = self.fast.fused
        if wanted is None:
            wanted = self.loaded.model.config.model_type in FUSED_TYPES
        if wanted and self._fused is None:
            self._fused = FusedDecoder(self.loaded.model)
            if self.fast.packed:
                self.packed_bytes = self._fused.pack(self.batch_size)
                self._decode_head = PackedHead(self.lm_head.weight, self.batch_size)
                self.packed_bytes += self._decode_head.weight.nbytes
            if self.fast.compile and not self.fast.packed:  # regional: all layers run the same two regions
                self._regions = tuple(
                    CompiledStage(fn, self.fast.compile_config(), self.compile_failure, self.synchronize)
                    for fn in (attention_inputs, layer_output)
                )
                self._fused.set_regions(*self._regions)
        return self._fused if wanted else None

    def decode_head(self):
        """The LM head the decode step runs: the packed one where the fused decoder's weights are packed."""
        self.fused_decoder()
        return self._decode_head or self.lm_head

    def compiled_forward(self) -> CompiledStage | None:
        """The compiled forward stage as one graph, shared by every batch of this engine (so each shape compiles
        once): the model's own forward when the fused decoder is off, and the fused decoder on packed weights
        (whose GEMMs are custom ops naming each layer's weight, so its layers cannot share regions); None when
        compiling is off or has failed, or the fused decoder's regions are compiled instead."""
        if not self.fast.compile or self.compile_failure.reason is not None:
            return None
        if self.fused_decoder() is not None and not self.fast.packed:
            return None
        if self._compiled is None:
            self._compiled = CompiledStage(
                StaticStep.forward,
                self.fast.compile_config(),
                self.compile_failure,
                self.synchronize,
                key=lambda args: (args[0].cache.rows_allocated, args[0].cache.capacity),
            )
        return self._compiled

    def compile_totals(self) -> tuple[bool, float, int]:
        """(the step runs compiled, seconds spent compiling, compiles) over this engine's life."""
        stages = [s for s in (self._compiled, *self._regions) if s is not None]
        active = bool(stages) and self.compile_failure.reason is None
        return active, sum(s.compile_s for s in stages), sum(s.compiles for s in stages)

    @torch.no_grad()
    def warm_up(self, rows: Sequence[int], capacity: int) -> float:
        """Compile (and on CUDA capture) the step for each row count at `capacity` (the budget; for the full cache
        the longest prompt + max_new_tokens) before timing or serving: one step on an empty cache per shape, thrown
        away. Returns the seconds spent compiling."""
        self.last_profile = DecodeProfile(kernel=self.fast.kernel, graphs=bool(self.fast.graphs))
        for n in rows:
            stepper = StaticStepper(self, n, capacity)
            try:
                for _ in range(self.fast.warmup_steps + 1 if self.fast.graphs else 1):
                    stepper.step(held=[])
                self.synchronize()
            finally:
                stepper.close()
        return self.last_profile.compile_s

    def eager_reason(self, on_logits=None) -> str | None:
        """Why this engine's steppers are eager ones (None: the static path)."""
        return self.fallback_reason or self._eager_reason or ("a logits callback" if on_logits is not None else None)

    @property
    def takes_forced(self) -> bool:
        """Teacher forcing runs on the eager stepper: on this engine only inside generate(forced=...) or when the
        policy sends the whole engine eager."""
        return self.eager_reason() is not None

    def check_sampling(self, params) -> None:
        """A request's own sampling params on the static path: per-row device tensors the captured sampler reads
        (greedy, temperature, top-p; top-k within the engine's top-k candidates). A greedy engine's step is argmax
        only, so it takes greedy requests alone. (Seeds, max_new_tokens, ignore_eos, stop tokens and budgets are
        per request on every path.)"""
        if self.fallback_reason is not None or params.greedy:
            return
        if self.sampling.greedy:
            raise DynTSError(
                "this engine decodes greedily on the static fast path (its captured step is argmax only): a sampled "
                "request needs an engine built with sampling, or the eager path (fast=False)"
            )
        k = top_k_count(self.sampling, self.vocab_size)
        if k < self.vocab_size and not 0 < params.top_k <= k:
            raise DynTSError(
                f"top_k {params.top_k} is not within the engine's {k} candidates the static fast path samples from: "
                f"give a top_k from 1 to {k}, or build the engine with a larger top_k (0: the whole vocabulary)"
            )

    @property
    def random_stream(self) -> str:
        """Engine.random_stream: the eager path's generators when this engine falls back to it."""
        return "per-sequence torch generators" if self.fallback_reason else "counter-based noise"

    def generate(self, prompts, seeds=None, chat=True, on_result=None, forced=None, on_logits=None):
        self._eager_reason = ("teacher forcing" if forced is not None else None) or (
            "a logits callback" if on_logits is not None else None
        )
        try:
            return super().generate(prompts, seeds, chat, on_result, forced, on_logits)
        finally:
            self._eager_reason = None

    def stream(self, requests, run=None, on_logits=None):
        self.last_profile = self._new_profile()  # one profile per stream (an EngineCore's steppers share one)
        return super().stream(requests, run, on_logits)

    def _new_profile(self) -> DecodeProfile:
        return DecodeProfile(kernel=self.fast.kernel, graphs=bool(self.fast.graphs), check_every=self.fast.check_every)

    def stepper(self, rows: int, capacity: int, on_logits=None):
        reason = self.eager_reason(on_logits)
        if reason is not None:
            if not self._warned:
                warnings.warn(f"fast decode path off for {reason}: using the eager engine", stacklevel=4)
                self._warned = True
            return super().stepper(rows, capacity, on_logits)
        if self.last_profile is None:
            self.last_profile = self._new_profile()
        return StaticStepper(self, rows, capacity)
