"""Eviction policies, one per file, and the registry that names them (registry.py)."""

from dynts.policies.base import Policy, TokenBatch
from dynts.policies.registry import POLICIES, budget_for, make_policy, policy_class, policy_config

__all__ = ["POLICIES", "Policy", "TokenBatch", "budget_for", "make_policy", "policy_class", "policy_config"]
