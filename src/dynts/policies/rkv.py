"""R-KV: keep tokens that are important and not redundant, as R-KV (Cai et al., 2025) defines both.

importance: the attention logits of the last `observation` queries to the older keys, max-pooled over the query
            heads of each KV group, then a softmax over the older keys (a query sees only keys at or before it),
            averaged over the queries and max-pooled along the keys with width `kernel`;
redundancy: the cosine similarity of every pair of keys in the whole cache, self-similarity zeroed. A key's
            most recent near-duplicate (the newest other key with similarity above `threshold`) is exempted:
            that one entry of its row is zeroed, the threshold is used for nothing else. Each key's redundancy is
            the mean of its column over all rows, normalised by a softmax over the whole cache;
score = lam * importance - (1 - lam) * redundancy, per layer and KV head. scope=shared averages the scores
over layers and KV heads and keeps one index set for all of them.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynts.errors import DynTSError
from dynts.policies.base import Policy
from dynts.policies.options import option_help
from dynts.policies.recent_queries import RecentQueries
from dynts.policies.scope import Scoped, check_scope, scope_option


@dataclass(frozen=True)
class RKVConfig:
    observation: int = option_help("the last queries whose attention gives the importance", default=8)
    kernel: int = option_help("width of the 1-D max pooling over the importance (odd)", default=7)
    lam: float = option_help(
        "weight of importance against redundancy: lam * importance - (1 - lam) * redundancy", default=0.1
    )
    threshold: float = option_help(
        "cosine similarity above which a key counts as a near-duplicate (finds the one exempted entry)", default=0.5
    )
    scope: str = scope_option()

    def __post_init__(self):
        check_scope(self.scope)
        if self.observation < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise DynTSError(f"observation must be >= 1 and kernel odd and >= 1, got {self}")
        if not 0 <= self.lam <= 1:
            raise DynTSError(f"lambda must be in [0, 1], got {self.lam}")


def redundancy(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """keys [heads, L, d] (the whole cache) -> redundancy [heads, L], a softmax over the L keys."""
    unit = keys.float() / (keys.float().norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)  # [heads, L, L]; updated in place below, it is the largest tensor here
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    slot = torch.arange(1, sim.shape[-1] + 1, device=keys.device, dtype=sim.dtype)  # slot index + 1
    newest = (sim > threshold).to(sim.dtype).mul_(slot).amax(dim=-1, keepdim=True)  # [heads, L, 1]; 0: none
    sim.masked_fill_(slot == newest, 0.0)  # exempt each row's most recent near-duplicate
    return sim.mean(dim=-2).softmax(dim=-1)


def importance(queries: torch.Tensor, keys: torch.Tensor, older: int, kernel: int) -> torch.Tensor:
    """queries [q_heads, n, d] (those of the newest n cached tokens, oldest first), keys [kv_heads, L, d] ->
    importance of the older keys [kv_heads, older]."""
    q_heads, n, d = queries.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    grouped = queries.float().reshape(kv_heads, q_heads // kv_heads, n, d)
    logits = grouped @ keys[:, None, :older].float().transpose(-1, -2) * d**-0.5  # [kvh, g, n, older]
    logits = logits.amax(dim=1)  # max over the group's query heads, before the softmax
    query_slots = torch.arange(length - n, length, device=keys.device)
    visible = torch.arange(older, device=keys.device)[None, :] <= query_slots[:, None]  # [n, older]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).mean(dim=1)  # [kvh, older]
    return F.max_pool1d(probs[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]


class RKVPolicy(RecentQueries, Scoped, Policy):
    name = "rkv"
    summary = "tokens important to the last queries and not redundant (per layer and KV head, or shared: scope)"
    Config = RKVConfig
    per_head = True  # the default scope; an instance follows its config
    capturable = True

    def score_older(self, cache, row, older):
        lam, length = self.config.lam, cache.lengths[row]
        per_layer = []
        for layer in cache.layers:
            queries = self.recent_queries(cache, row, layer)
            keys = layer.keys[row, :, :length]
            important = importance(queries, keys, older, self.config.kernel)
            redundant = redundancy(keys, self.config.threshold)[:, :older]
            per_layer.append(lam * important - (1 - lam) * redundant)
        return self.scoped(torch.stack(per_layer))
