"""SnapKV, decode variant: at compression, a token's score is the attention it gets from the last 32 queries,
averaged over the query heads of its KV group, summed over the queries and smoothed by 1-D average pooling.
Selection is per layer and KV head."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynts.errors import DynTSError
from dynts.policies.base import Policy
from dynts.policies.options import option_help
from dynts.policies.recent_queries import RecentQueries


@dataclass(frozen=True)
class SnapKVConfig:
    observation: int = option_help("the last queries whose attention scores the older tokens", default=32)
    kernel: int = option_help("width of the 1-D average pooling over the scores (odd)", default=7)

    def __post_init__(self):
        if self.observation < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise DynTSError(f"observation must be >= 1 and kernel odd and >= 1, got {self}")


class SnapKVPolicy(RecentQueries, Policy):
    name = "snapkv"
    summary = "per layer and KV head: the tokens the last queries attend to most (pooled)"
    Config = SnapKVConfig
    per_head = True
    capturable = True

    def score_older(self, cache, row, older):
        per_layer = []
        for layer in cache.layers:
            votes = self.recent_attention(cache, row, layer).sum(dim=1)[:, :older]  # [kvh, older]
            k = self.config.kernel
            per_layer.append(F.avg_pool1d(votes[:, None], k, stride=1, padding=k // 2, count_include_pad=False)[:, 0])
        return torch.stack(per_layer)
