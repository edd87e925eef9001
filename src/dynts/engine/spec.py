"""Everything an engine is built from besides the model, in one value: what `dynts.api.build_engine` (the one
constructor of every engine), the CLI, the harness and the executors pass around.

Hashable and picklable: it travels with each task to a worker (Ray), and a model host keeps one engine per spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynts.config import BudgetConfig, SamplingConfig, check_batch_size
from dynts.engine.scheduler import check_batching
from dynts.policies.options import as_dict


@dataclass(frozen=True)
class EngineSpec:
    """policy: a registered name; budget / sampling: its frame and the engine's sampling protocol; head_path: the
    importance head's checkpoint (None: the one shipped for the model); trace_steps: keep a per-step trace;
    fast: the static fast decode path (None: on with CUDA or a CPU); policy_options: (key, value) pairs, sorted
    (hashable); batching: "continuous" or "static"; kernel / graphs: the fast path's decode attention and CUDA
    graphs (None: $DYNTS_KERNEL / $DYNTS_GRAPHS, else the device's default); max_model_len: cache slots per row of a
    policy that never compresses when requests arrive over time (None: Engine's default, see engine.py)."""

    policy: str = "full"
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 8
    head_path: str | None = None
    trace_steps: bool = False
    fast: bool | None = None
    policy_options: tuple[tuple[str, Any], ...] = ()
    batching: str = "continuous"
    kernel: str | None = None
    graphs: bool | None = None
    max_model_len: int | None = None
    compile: bool | None = None  # torch.compile the fast path's step; None: $DYNTS_COMPILE, else off

    def __post_init__(self):
        check_batch_size(self.batch_size)
        check_batching(self.batching)
        if isinstance(self.policy_options, dict):
            object.__setattr__(self, "policy_options", options_key(self.policy_options))

    @classmethod
    def of(cls, engine) -> EngineSpec:
        """The spec of an already built engine (its head is whatever that engine holds)."""
        return cls(
            engine.policy_name,
            engine.budget,
            engine.sampling,
            engine.batch_size,
            trace_steps=engine.trace_steps,
            policy_options=options_key(as_dict(engine.policy.config)),
            batching=engine.batching,
            max_model_len=engine.max_model_len,
        )

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.policy_options)


def options_key(options: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """Policy options as sorted (key, value) pairs, the hashable form an EngineSpec holds."""
    return tuple(sorted((options or {}).items()))
