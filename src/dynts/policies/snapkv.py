"""SnapKV, decode variant: at compression, a token's score is the attention it gets from the last 32 queries,
averaged over the query heads of its KV group, summed over the queries and smoothed by 1-D average pooling.
Selection is per layer and KV head; scope=shared averages the scores over layers and KV heads (pooling is
linear, so before or after the average is the same) and keeps one index set for all of them."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynts.errors import DynTSError
from dynts.policies.base import Policy
from dynts.policies.options import option_help
from dynts.policies.recent_queries import RecentQueries
from dynts.policies.scope import Scoped, check_scope, scope_option


@dataclass(frozen=True)
class SnapKVConfig:
    observation: int = option_help("the last queries whose attention scores the older tokens", default=32)
    kernel: int = option_help("width of the 1-D average pooling over the scores (odd)", default=7)
    scope: str = scope_option()

    def __post_init__(self):
        check_scope(self.scope)
        if self.observation < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise DynTSError(f"observation must be >= 1 and kernel odd and >= 1, got {self}")


class SnapKVPolicy(RecentQueries, Scoped, Policy):
    name = "snapkv"
    summary = "the tokens the last queries attend to most, pooled (per layer and KV head, or shared: scope)"
    Config = SnapKVConfig
    per_head = True  # the default scope; an instance follows its config
    capturable = True

    def score_older(self, cache, row, older):
        per_layer = []
        for layer in cache.layers:
            votes = self.recent_attention(cache, row, layer).sum(dim=1)[:, :older]  # [kvh, older]
            k = self.config.kernel
            per_layer.append(F.avg_pool1d(votes[:, None], k, stride=1, padding=k // 2, count_include_pad=False)[:, 0])
        return self.scoped(torch.stack(per_layer))
