"""Shared by SnapKV and R-KV: remember each row's last N queries per layer, and turn them into attention.

Queries are stored in a ring indexed by original position modulo N, so no shifting happens per step.
"""

import torch

from dynts.kv.attention import attention_probs


class RecentQueries:
    """Mixin for policies that score by the attention of an observation window of recent queries."""

    observes_attention = True

    def __init__(self, budget, config=None):
        super().__init__(budget, config)
        self.observation = self.config.observation

    def setup(self, cache):
        n = self.observation
        cache.add_row_buffer("recent_q", lambda layer: (self._num_q_heads, n, layer.head_dim), dtype=torch.float32)

    def bind(self, loaded):
        self._num_q_heads = loaded.model.config.num_attention_heads

    def observe_attention(self, layer_idx, query, key, probs, ctx):
        ring = ctx.cache.layers[layer_idx].rows["recent_q"]
        n = self.observation
        if ctx.prefill_row is not None:
            q_len = query.shape[2]
            take = min(n, q_len)
            slots = ctx.positions[q_len - take :] % n
            ring[ctx.prefill_row][:, slots] = query[0, :, q_len - take :].float()
        else:
            slots = ctx.positions % n
            ring[torch.arange(query.shape[0], device=query.device), :, slots] = query[:, :, 0].float()

    def recent_queries(self, cache, row, layer) -> torch.Tensor:
        """The last N queries of `row` (N = min(observation, length)), oldest first: [q_heads, N, head_dim]. They
        belong to the row's newest N cached tokens, so the i-th sits at slot length - N + i."""
        n = min(self.observation, cache.lengths[row])
        ring = layer.rows["recent_q"][row]  # [H, N, d]
        newest = cache.next_position[row] - 1  # original position of the newest cached token
        order = torch.arange(newest - n + 1, newest + 1, device=ring.device) % self.observation
        return ring[:, order]

    def recent_attention(self, cache, row, layer) -> torch.Tensor:
        """Attention of the last N queries of `row` over its cached keys, averaged over each KV group's query
        heads: [kv_heads, N, L]. A query only sees keys at or before its own slot."""
        length = cache.lengths[row]
        queries = self.recent_queries(cache, row, layer).unsqueeze(0).to(layer.keys.dtype)  # [1, H, n, d]
        keys = layer.keys[row : row + 1, :, :length]
        scaling = queries.shape[-1] ** -0.5
        probs = attention_probs(queries, keys, None, scaling, causal=True)  # [1, kvh, g, n, L]
        return probs[0].mean(dim=1)
