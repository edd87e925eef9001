"""Which slots a compression keeps: the one rule every decode path uses (eager, static, replay).

A row holding L tokens keeps its newest W slots and the k = floor(r (L - W)) best older slots by the policy's
scores, in their original order. Protected (+inf) slots rank above the row's best real score and, among
themselves, newer above older, so when more are protected than fit the newest are kept and the row counts as an
overflow. Ranking happens on the device: nothing is read back to the host, so the fast path can run it between
captured steps. Rows compressed together must hold the same number of tokens (they reach the budget together).
"""

from __future__ import annotations

import torch


def keep_slots(policy, cache, rows: list[int], budget=None) -> torch.Tensor:
    """Sorted kept slots for `rows`: [m, kept], or [m, layers, kv_heads, kept] for per-head policies. budget: the
    rows' B / W / r frame when they decode under a budget of their own (None: the policy's)."""
    length = cache.lengths[rows[0]]
    if any(cache.lengths[r] != length for r in rows):
        raise ValueError("rows compacted together must hold the same number of tokens")
    budget = policy.budget if budget is None else budget
    window = budget.window
    older = length - window
    k = budget.selected_count(length)
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
    policy.note_overflow(protected.sum(dim=-1) > k)
    return torch.cat([chosen, recent.expand(len(rows), window)], dim=-1)
