"""The Python entry points: build an engine for a loaded model (build_engine, from an EngineSpec: the one
constructor), or go from a model name and prompts to texts."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine, GenerationOutput
from dynts.engine.spec import EngineSpec, options_key
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.models.loading import LoadedModel, load_model
from dynts.policies import Policy
from dynts.policies.registry import budget_for

# Where the static fast path is the default: on CUDA its captured step, on a CPU its eager step on packed weights
# (benchmarks/vs_vllm.py: 104 tok/s against the eager engine's 88 on the embedded model, same tokens).
FAST_DEVICES = ("cuda", "cpu")


def build_engine(
    loaded: LoadedModel,
    spec: EngineSpec,
    head=None,
    on_step: Callable[[int], None] | None = None,
    policy: Policy | None = None,
    fast_config: FastConfig | None = None,
) -> Engine:
    """The one constructor of every engine: the spec's settings on a loaded model. The static fast path
    (FastEngine) when spec.fast is True, or None on CUDA or a CPU (FAST_DEVICES); else the eager Engine.

    head: a loaded importance head (else spec.head_path, else the model's shipped one); on_step: called after each
    decode step with its row count; policy: a built Policy instead of spec.policy's; fast_config: the fast path's
    settings instead of spec.kernel / spec.graphs over the environment's."""
    use_fast = loaded.device.type in FAST_DEVICES if spec.fast is None else spec.fast
    common = dict(
        head=head,
        head_path=spec.head_path,
        trace_steps=spec.trace_steps,
        on_step=on_step,
        policy_options=spec.options,
        batching=spec.batching,
        max_model_len=spec.max_model_len,
    )
    chosen = policy if policy is not None else spec.policy
    if use_fast:
        fast = fast_config or FastConfig.from_environment(kernel=spec.kernel, graphs=spec.graphs, compile=spec.compile)
        return FastEngine(loaded, chosen, spec.budget, spec.sampling, spec.batch_size, fast=fast, **common)
    return Engine(loaded, chosen, spec.budget, spec.sampling, spec.batch_size, **common)


def make_engine(
    loaded: LoadedModel,
    policy="full",
    budget=None,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    head=None,
    head_path=None,
    fast: bool | None = None,
    fast_config: FastConfig | None = None,
    trace_steps: bool = False,
    on_step: Callable[[int], None] | None = None,
    policy_options: Mapping[str, Any] | None = None,
    batching: str = "continuous",
    max_model_len: int | None = None,
) -> Engine:
    """build_engine with the spec's fields as arguments (policy may also be a built Policy): FastEngine on CUDA or
    a CPU (fast=None) or when fast=True, else the eager Engine."""
    built = policy if isinstance(policy, Policy) else None
    spec = EngineSpec(
        built.name if built is not None else policy,
        budget if budget is not None else BudgetConfig(None),
        sampling or SamplingConfig(),
        batch_size,
        head_path=None if head_path is None else str(head_path),
        trace_steps=trace_steps,
        fast=fast,
        policy_options=options_key(dict(policy_options or {})),
        batching=batching,
        max_model_len=max_model_len,
    )
    return build_engine(loaded, spec, head=head, on_step=on_step, policy=built, fast_config=fast_config)


def generate(
    model: str | LoadedModel,
    prompts: Sequence[str | Sequence[int]],
    policy: str = "full",
    budget: int | None = None,
    window: int = 0,
    ratio: float = 1.0,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    head=None,
    device: str | None = None,
    dtype: str | None = None,
    seeds: Sequence[int] | None = None,
    chat: bool = True,
    fast: bool | None = None,
    policy_options: Mapping[str, Any] | None = None,
    batching: str = "continuous",
) -> GenerationOutput:
    """One call from a model name (or a loaded model) and prompts to texts, token ids and statistics.
    fast: the static fast decode path; None = on with CUDA. policy_options: the policy's settings by name
    (`dynts policies` lists them), e.g. {"observation": 16} for snapkv. batching: "continuous" (a finished row
    takes the next prompt at once) or "static"."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    budget_config = budget_for(policy, budget, window, ratio)
    is_path = isinstance(head, (str, os.PathLike))  # a checkpoint path, else a loaded ImportanceHead (or None)
    engine = make_engine(
        loaded,
        policy,
        budget_config,
        sampling,
        batch_size,
        head=None if is_path else head,
        head_path=head if is_path else None,
        fast=fast,
        policy_options=policy_options,
        batching=batching,
    )
    return engine.generate(prompts, seeds=seeds, chat=chat)
