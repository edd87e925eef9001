"""DynTS: memory-bounded reasoning inference with learned thinking-token selection."""

__version__ = "0.1.0"
