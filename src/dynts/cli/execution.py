"""Turning checked flags into running work: load the model and build the engine, or start Ray workers."""

from __future__ import annotations

from dynts.cli.args import engine_spec_from_args


def build_engine(args, trace_steps: bool = False, on_step=None):
    """Validate every flag before the (slow) model load, then load and build the engine."""
    from dataclasses import replace

    from dynts.api import build_engine as build
    from dynts.models.loading import load_model

    spec = replace(engine_spec_from_args(args), trace_steps=trace_steps)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    return build(loaded, spec, on_step=on_step)


def open_executor(args, model: str, dtype: str | None):
    """Check the Ray flags, then start Ray workers (--ray) or load the model here."""
    from dynts.runtime.ray_executor import ray_config_from_args

    config = ray_config_from_args(args)
    if config is None:
        from dynts.models.loading import load_model
        from dynts.runtime.executor import LocalExecutor

        return LocalExecutor(load_model(model, device=args.device, dtype=dtype))
    from dynts.runtime.ray_executor import ModelArgs, RayExecutor

    return RayExecutor(config, ModelArgs(model, args.device, dtype))
