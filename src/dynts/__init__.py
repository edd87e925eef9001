"""DynTS: memory-bounded reasoning inference with learned thinking-token selection."""

__version__ = "0.1.0"


def __getattr__(name):
    """Lazy public API, so importing the harness modules stays light."""
    if name in ("generate", "Engine", "GenerationOutput", "GenerationResult"):
        from . import engine

        return getattr(engine, name)
    if name == "load_model":
        from .models import load_model

        return load_model
    if name in ("BudgetConfig", "SamplingConfig"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'dynts' has no attribute {name!r}")
