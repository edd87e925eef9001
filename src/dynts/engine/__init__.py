"""The eager decode engine: prefill, decode, sample, stop, compress, count; its core (requests at any time); and
teacher-forced replay."""

from dynts.config import SamplingParams
from dynts.engine.core import EngineCore, RequestOutput
from dynts.engine.requests import Request

__all__ = ["EngineCore", "Request", "RequestOutput", "SamplingParams"]
