"""Policy registry: a name maps to a Policy class and the preset options it runs with.

Adding a policy: write one file with a Policy subclass (and its config dataclass), add one line below.
"""

from ..errors import DynTSError
from .base import Policy, TokenBatch
from .dynts import DynTSPolicy
from .full import FullPolicy
from .h2o import H2OPolicy
from .rkv import RKVPolicy
from .sepllm import SepLLMPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .window import WindowPolicy

POLICIES: dict[str, tuple[type[Policy], dict]] = {
    "full": (FullPolicy, {}),
    "window": (WindowPolicy, {}),
    "streaming": (StreamingPolicy, {}),
    "sepllm": (SepLLMPolicy, {}),
    "h2o": (H2OPolicy, {}),
    "snapkv": (SnapKVPolicy, {}),
    "rkv": (RKVPolicy, {}),
    "dynts": (DynTSPolicy, {}),
    "dynts-random": (DynTSPolicy, {"selection": "random"}),
    "dynts-bottom": (DynTSPolicy, {"selection": "bottom"}),
    "dynts-noquestion": (DynTSPolicy, {"protect_prompt": False}),
}


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise DynTSError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name][0]


def make_policy(name: str, budget, **options) -> Policy:
    """Build a policy; options (head, head_path, seed) reach the policies that use them."""
    cls, preset = POLICIES[name] if name in POLICIES else (policy_class(name), {})
    return cls.create(budget, **preset, **options)


__all__ = ["POLICIES", "Policy", "TokenBatch", "make_policy", "policy_class"]
