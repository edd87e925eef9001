"""The Python entry points: build an engine for a loaded model, or go from a model name and prompts to texts."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from dynts.config import SamplingConfig
from dynts.engine.engine import Engine, GenerationOutput
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.models.loading import LoadedModel, load_model
from dynts.policies.registry import budget_for


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
    **engine_options,
) -> Engine:
    """FastEngine on CUDA (fast=None) or when fast=True, else the eager Engine; same arguments as Engine."""
    use_fast = loaded.device.type == "cuda" if fast is None else fast
    if use_fast:
        return FastEngine(
            loaded,
            policy,
            budget,
            sampling,
            batch_size,
            head=head,
            head_path=head_path,
            fast=fast_config,
            **engine_options,
        )
    return Engine(loaded, policy, budget, sampling, batch_size, head=head, head_path=head_path, **engine_options)


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
