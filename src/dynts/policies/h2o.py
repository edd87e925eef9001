"""H2O: heavy hitters. A token's score is the attention it has received so far, summed over every query since
it entered the cache (the prompt's queries and each decode step's), per layer and KV head (the query heads of
a group summed): H2O's accumulation rule. scope=shared averages the scores over layers and KV heads and keeps
one index set for all of them."""

from dataclasses import dataclass

import torch

from dynts.policies.base import Policy
from dynts.policies.scope import Scoped, check_scope, scope_option


@dataclass(frozen=True)
class H2OConfig:
    scope: str = scope_option()

    def __post_init__(self):
        check_scope(self.scope)


class H2OPolicy(Scoped, Policy):
    name = "h2o"
    summary = "the tokens that received the most attention so far (per layer and KV head, or shared: scope)"
    Config = H2OConfig
    per_head = True  # the default scope; an instance follows its config
    capturable = True
    observes_attention = True
    wants_probs = True

    def setup(self, cache):
        cache.add_slot_buffer("h2o", per_head=True, dtype=torch.float32, fill=0.0)

    def observe_attention(self, layer_idx, query, key, probs, ctx):
        received = probs.sum(dim=(2, 3))  # [b, kvh, kv]: summed over the group's heads and the queries
        buffer = ctx.cache.layers[layer_idx].slot["h2o"]
        if ctx.prefill_row is not None:
            buffer[ctx.prefill_row, :, : received.shape[-1]] += received[0]
        else:
            buffer[:, :, : received.shape[-1]] += received

    def score_older(self, cache, row, older):
        return self.scoped(torch.stack([layer.slot["h2o"][row, :, :older] for layer in cache.layers]))
