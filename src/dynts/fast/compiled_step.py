"""torch.compile for the static step's forward stage: compiled once per shape, eager again if compiling fails.

The static cache gives every decode step of a batch one shape (rows x capacity), so the compiled forward is
traced without dynamic shapes (dynamic=False) and compiled once per row count; a release to fewer rows compiles
that count once more (the compile time of every shape is counted in DecodeProfile.compile_s). The forward reads
only tensors that stay put between steps (the cache, the DecodeState), which is also what lets the compiled
kernels be captured as CUDA graphs afterwards: on CUDA the modes that add CUDA graphs of their own are not used,
the step captures its stages itself.

A compile that raises (an unsupported op, a missing C++ compiler, a backend bug) leaves the step on the eager
forward for the rest of the engine's life, with one warning naming the cause: compilation is an optimisation, and
fullgraph tracing runs before anything executes, so the eager retry of that step sees untouched state.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dynts.config import environment_switch
from dynts.errors import DynTSError

# Modes measured on the 2-core CPU (benchmarks/vs_vllm.py): "default" is inductor's; max-autotune-no-cudagraphs
# also benchmarks GEMM templates at compile time (much slower to compile). reduce-overhead would add CUDA graphs of
# inductor's own, which the step's own capture replaces.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
COMPILE_ENV = "DYNTS_COMPILE"
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompileConfig:
    """How the forward stage is compiled. backend: a torch.compile backend name; mode: one of COMPILE_MODES;
    fullgraph: one graph for the whole stage (a graph break is a compile failure, hence the eager fallback)."""

    backend: str = "inductor"
    mode: str = "default"
    fullgraph: bool = True

    def __post_init__(self):
        if self.mode not in COMPILE_MODES:
            raise DynTSError(f"unknown compile mode {self.mode!r}; choose one of {', '.join(COMPILE_MODES)}")


def compile_from_environment(given: bool | None) -> bool:
    """--compile / --no-compile if given, else DYNTS_COMPILE=0/1, else off."""
    if given is not None:
        return given
    return bool(environment_switch(COMPILE_ENV))


class CompileFailure:
    """Why compiling failed for an engine (None: it has not); shared by the engine's steps, so the warning is
    given once and later batches do not try again."""

    def __init__(self):
        self.reason: str | None = None


class CompiledStage:
    """fn compiled with `config`: the first call of each shape (key(args): by default the first argument's shape)
    is a compile (its time goes to compile_s); an exception while compiling falls back to fn for good, with one
    warning."""

    def __init__(
        self,
        fn: Callable,
        config: CompileConfig,
        failure: CompileFailure,
        synchronize: Callable[[], None],
        key: Callable = lambda args: tuple(args[0].shape),
    ):
        self.fn = fn
        self.key = key
        self.config = config
        self.failure = failure
        self.synchronize = synchronize
        mode = None if config.mode == "default" else config.mode
        # One graph per (policy type, row count, capacity): a sweep's cells and a batch's releases add up past
        # dynamo's default of 8, after which it would silently run the step eagerly.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        self.compiled = torch.compile(fn, backend=config.backend, mode=mode, fullgraph=config.fullgraph, dynamic=False)
        self.shapes: set = set()
        self.compile_s = 0.0
        self.compiles = 0

    @property
    def active(self) -> bool:
        return self.failure.reason is None

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.fn(*args, **kwargs)
        shape_key = self.key(args)
        if shape_key in self.shapes:
            return self.compiled(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
            self.synchronize()
        except Exception as exc:  # noqa: BLE001 (any failure of the optional compile falls back to eager)
            self.failure.reason = describe(exc)
            warnings.warn(
                f"torch.compile of the decode step failed ({self.failure.reason}); the fast path goes on eagerly",
                stacklevel=3,
            )
            return self.fn(*args, **kwargs)
        self.shapes.add(shape_key)
        self.compile_s += time.perf_counter() - start
        self.compiles += 1
        return out


def describe(exc: BaseException) -> str:
    """The root cause of a compile error in one line (dynamo wraps a backend's exception in its own)."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    text = str(root).strip()
    return f"{type(root).__name__}: {text.splitlines()[0] if text else ''}"
