"""R-KV: keep tokens that are important and not redundant.

importance: attention from the last 8 queries (mean over queries and the KV group's query heads),
            max-pooled with kernel 7;
redundancy: each older key's mean cosine similarity to the other older keys, with similarities under the
            threshold ignored, normalised by a softmax over the keys. Of a group of near-duplicates the most
            recent member is exempt (redundancy 0), so repeated content keeps its newest copy;
score = lambda * importance - (1 - lambda) * redundancy. Selection is per layer and KV head.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynts.errors import DynTSError
from dynts.policies.base import Policy
from dynts.policies.options import option_help
from dynts.policies.recent_queries import RecentQueries


@dataclass(frozen=True)
class RKVConfig:
    observation: int = option_help("the last queries whose attention gives the importance", default=8)
    kernel: int = option_help("width of the 1-D max pooling over the importance (odd)", default=7)
    lam: float = option_help(
        "weight of importance against redundancy: lam * importance - (1 - lam) * redundancy", default=0.1
    )
    threshold: float = option_help("cosine similarity above which two keys count as near-duplicates", default=0.5)

    def __post_init__(self):
        if self.observation < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise DynTSError(f"observation must be >= 1 and kernel odd and >= 1, got {self}")
        if not 0 <= self.lam <= 1:
            raise DynTSError(f"lambda must be in [0, 1], got {self.lam}")


def redundancy(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """keys [heads, n, d] -> softmax-normalised redundancy [heads, n]."""
    unit = F.normalize(keys.float(), dim=-1)
    sim = unit @ unit.transpose(-1, -2)
    n = sim.shape[-1]
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    sim = torch.where(sim >= threshold, sim, torch.zeros_like(sim))
    # Exempt the most recent member of each near-duplicate group: a key with no similar key after it.
    later = torch.triu(torch.ones(n, n, dtype=torch.bool, device=keys.device), diagonal=1)
    has_later_duplicate = ((sim > 0) & later).any(dim=-1)
    score = sim.mean(dim=-1) * has_later_duplicate
    return score.softmax(dim=-1)


class RKVPolicy(RecentQueries, Policy):
    name = "rkv"
    summary = "per layer and KV head: tokens important to the last queries and not redundant"
    Config = RKVConfig
    per_head = True
    capturable = True

    def score_older(self, cache, row, older):
        k, lam = self.config.kernel, self.config.lam
        per_layer = []
        for layer in cache.layers:
            attn = self.recent_attention(cache, row, layer).mean(dim=1)[:, :older]  # [kvh, older]
            importance = F.max_pool1d(attn[:, None], k, stride=1, padding=k // 2)[:, 0]
            redundant = redundancy(layer.keys[row, :, :older], self.config.threshold)
            per_layer.append(lam * importance - (1 - lam) * redundant)
        return torch.stack(per_layer)
