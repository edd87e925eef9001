"""Policy registry: a name maps to a Policy class and the preset options it runs with.

Adding a policy: write one file with a Policy subclass (and its config dataclass), add one line below.
"""

from dynts.config import BudgetConfig
from dynts.errors import DynTSError
from dynts.policies.base import Policy
from dynts.policies.dynts import DynTSPolicy
from dynts.policies.full import FullPolicy
from dynts.policies.h2o import H2OPolicy
from dynts.policies.rkv import RKVPolicy
from dynts.policies.sepllm import SepLLMPolicy
from dynts.policies.snapkv import SnapKVPolicy
from dynts.policies.streaming import StreamingPolicy
from dynts.policies.window import WindowPolicy

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


def budget_for(name: str, budget: int | None, window: int = 0, ratio: float = 1.0) -> BudgetConfig:
    """The B / W / r frame policy `name` runs under: no budget for a policy that never compresses."""
    cls = policy_class(name)
    if not cls.compresses or budget is None:
        return BudgetConfig(None)
    return BudgetConfig(budget, window, ratio, allow_zero_window=cls.allows_zero_window)
