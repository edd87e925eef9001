"""DynTS: memory-bounded reasoning inference with learned thinking-token selection."""

__version__ = "0.1.0"

_LAZY = {
    "generate": "dynts.api",
    "make_engine": "dynts.api",
    "Engine": "dynts.engine.engine",
    "GenerationOutput": "dynts.engine.engine",
    "GenerationResult": "dynts.engine.engine",
    "load_model": "dynts.models.loading",
    "BudgetConfig": "dynts.config",
    "SamplingConfig": "dynts.config",
    "SamplingParams": "dynts.config",
    "EngineCore": "dynts.engine.core",
    "RequestOutput": "dynts.engine.core",
    "Request": "dynts.engine.requests",
    "EngineSpec": "dynts.engine.spec",
    "build_engine": "dynts.api",
}


def __getattr__(name):
    """Lazy public API, so `import dynts` (and `dynts --help`) stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynts' has no attribute {name!r}")


__all__ = sorted(_LAZY)
