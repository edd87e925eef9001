"""Scope of the attention-based baselines (H2O, SnapKV, R-KV): where their index sets live.

per-head: an index set per layer and KV head, from that head's own scores (the methods as their papers define
them). shared: the per-head scores averaged over layers and KV heads, and one index set for all of them: the
protocol of the DynTS paper's baselines, and the constraint DynTS itself has.
"""

from __future__ import annotations

import torch

from dynts.errors import DynTSError
from dynts.policies.options import option_help

SCOPES = ("per-head", "shared")


def scope_option():
    """The `scope` field of a baseline's config."""
    return option_help(
        "per-head: an index set per layer and KV head (the original method); shared: the scores averaged over "
        "layers and KV heads, one index set for all (the DynTS paper's baselines)",
        default="per-head",
    )


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise DynTSError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")


class Scoped:
    """Mixin: `per_head` follows the config's scope; `scoped` turns per-head scores into the policy's scores."""

    def __init__(self, budget, config=None):
        super().__init__(budget, config)
        self.per_head = self.config.scope == "per-head"

    def scoped(self, scores: torch.Tensor) -> torch.Tensor:
        """[layers, kv_heads, older] -> the same (per-head) or their mean over layers and heads [older] (shared)."""
        return scores if self.per_head else scores.mean(dim=(0, 1))
