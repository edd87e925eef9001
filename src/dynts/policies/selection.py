"""Which slots a compression keeps, for several rows at once, without reading anything back to the host.

The rule and the ranking are Policy.select's (W recent + the best floor(r (L - W)) older slots; protected
(+inf) slots rank above the row's best real score, newer above older, so that when more are protected than fit
the newest are kept), applied to all rows that reach the budget at the same step with one top-k. Policy.select
counts protected overflows with a host read; here they are counted in a device tensor read once per batch.
"""

from __future__ import annotations

import torch


def select_keep(policy, cache, rows: list[int], overflow: torch.Tensor) -> torch.Tensor:
    """Sorted kept slots for `rows`, which all hold the same number of tokens: [m, kept], or
    [m, layers, kv_heads, kept] for per-head policies. overflow (a 0-dim device tensor) counts rows whose
    protected tokens did not all fit."""
    length = cache.lengths[rows[0]]
    if any(cache.lengths[r] != length for r in rows):
        raise ValueError("rows compacted together must hold the same number of tokens")
    window = policy.budget.window
    older = length - window
    k = policy.budget.selected_count(length)
    scores = torch.stack([policy.score_older(cache, r, older) for r in rows]).float()
    recent = torch.arange(older, length, device=scores.device)
    if policy.per_head:
        chosen = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        return torch.cat([chosen, recent.expand(*chosen.shape[:-1], window)], dim=-1)
    protected = torch.isposinf(scores)
    scores = scores.double()
    ceiling = scores.masked_fill(protected, float("-inf")).amax(dim=-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)
    slot_rank = torch.arange(older, device=scores.device, dtype=torch.float64)
    ranked = torch.where(protected, ceiling + 1.0 + slot_rank, scores)
    chosen = ranked.topk(k, dim=-1).indices.sort(dim=-1).values
    overflow += (protected.sum(dim=-1) > k).sum()
    return torch.cat([chosen, recent.expand(len(rows), window)], dim=-1)
