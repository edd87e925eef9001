"""Eviction policies, one per file, and the registry that names them (registry.py).

The registry imports no policy class until one is looked up, and Policy/TokenBatch load on first use, so the
policy names can be read without torch.
"""

from dynts.policies.registry import POLICIES, POLICY_NAMES, budget_for, make_policy, policy_class, policy_config

__all__ = [
    "POLICIES",
    "POLICY_NAMES",
    "Policy",
    "TokenBatch",
    "budget_for",
    "make_policy",
    "policy_class",
    "policy_config",
]


def __getattr__(name):
    if name in ("Policy", "TokenBatch"):
        from dynts.policies import base

        return getattr(base, name)
    raise AttributeError(f"module 'dynts.policies' has no attribute {name!r}")
