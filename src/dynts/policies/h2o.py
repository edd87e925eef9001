"""H2O: heavy hitters. A token's score is the attention it has received so far, summed over the decode
steps (and the prompt), per layer and KV head (query heads of a group are summed)."""

import torch

from dynts.policies.base import Policy


class H2OPolicy(Policy):
    name = "h2o"
    summary = "per layer and KV head: the tokens that received the most attention so far"
    per_head = True
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
        return torch.stack([layer.slot["h2o"][row, :, :older] for layer in cache.layers])
