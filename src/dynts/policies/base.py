"""What every eviction policy shares: when to compress and how many tokens survive.

A compression of a sequence holding L tokens keeps its most recent W tokens and the k = floor(r (L - W)) best
of the older ones, in their original order (DESIGN §1). A policy only says what "best" means by scoring the
older slots, either one score per slot (one index set for all layers and heads) or one per layer and KV head.
Slots scored +inf are protected; if more are protected than fit, the newest of them are kept and the event is
counted in `protected_overflow`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dynts.kv.cache import BudgetedCache
from dynts.config import BudgetConfig


@dataclass
class TokenBatch:
    """Tokens entering the cache in one forward: for prefill a run of tokens of one row (its prompt, or a
    teacher-forced chunk), for decode one per row."""

    rows: torch.Tensor  # [n] cache rows
    slots: torch.Tensor  # [n, q] slots they occupy
    positions: torch.Tensor  # [n, q] original positions
    token_ids: torch.Tensor  # [n, q]
    hidden: torch.Tensor  # [n, q, hidden] last hidden state (after the final norm)
    is_prompt: bool
    in_answer: torch.Tensor  # [n, q] bool: the token entered after its sequence's end-of-thinking marker


class Policy:
    """Base eviction policy. Subclasses set the class flags and implement `score_older`."""

    name: ClassVar[str] = "base"
    compresses: ClassVar[bool] = True
    per_head: ClassVar[bool] = False  # one index set per layer and KV head instead of one for all
    protects_prompt: ClassVar[bool] = False  # the whole prompt must fit in what a compression keeps
    observes_attention: ClassVar[bool] = False  # wants observe_attention calls from the attention function
    wants_probs: ClassVar[bool] = False  # ... with attention probabilities computed
    allows_zero_window: ClassVar[bool] = False
    count_overflow: bool = True  # count protected overflows (a host sync per compression; fast paths turn it off)

    def __init__(self, budget: BudgetConfig):
        self.budget = budget
        self.protected_overflow = 0

    @classmethod
    def create(cls, budget: BudgetConfig, **options) -> "Policy":
        """Registry entry point; options a policy does not use (head, seed, ...) are ignored."""
        return cls(budget)

    # --- lifecycle hooks (all optional) -------------------------------------------------------
    def bind(self, loaded) -> None:
        """Called once with the LoadedModel before any generation."""

    def setup(self, cache: BudgetedCache) -> None:
        """Attach the per-slot / per-row buffers this policy needs to a fresh cache."""

    def on_tokens(self, cache: BudgetedCache, batch: TokenBatch) -> None:
        """Score tokens as they enter the cache."""

    def observe_attention(self, layer_idx: int, query, key, probs, ctx) -> None:
        """Called by the attention function of every layer when `observes_attention` is set."""

    # --- selection ----------------------------------------------------------------------------
    def score_older(self, cache: BudgetedCache, row: int, older: int) -> torch.Tensor:
        """Scores of slots [0, older) of `row`: shape [older], or [layers, kv_heads, older] if per_head."""
        raise NotImplementedError

    def select(self, cache: BudgetedCache, row: int) -> torch.Tensor:
        """Sorted slot indices to keep for one row."""
        length = cache.lengths[row]
        window = self.budget.window
        older = length - window
        k = self.budget.selected_count(length)
        device = cache.device
        recent = torch.arange(older, length, device=device)
        scores = self.score_older(cache, row, older).float()
        if self.per_head:
            chosen = scores.topk(k, dim=-1).indices.sort(dim=-1).values
            return torch.cat([chosen, recent.expand(*chosen.shape[:-1], window)], dim=-1)
        # Protected slots outrank every score and, among themselves, newer beats older: when more are protected
        # than fit, the newest are kept. Ranking on the device needs no host sync.
        protected = torch.isposinf(scores)
        scores = scores.double()
        ceiling = scores.masked_fill(protected, float("-inf")).max().nan_to_num(0.0, 0.0, 0.0)
        slot_rank = torch.arange(older, device=device, dtype=torch.float64)
        ranked = torch.where(protected, ceiling + 1.0 + slot_rank, scores)
        chosen = ranked.topk(k).indices.sort().values
        if self.count_overflow:
            self.protected_overflow += int(protected.sum()) > k
        return torch.cat([chosen, recent])


def slot_index_scores(older: int, device) -> torch.Tensor:
    """Newer slots score higher: slots hold tokens in their original order."""
    return torch.arange(older, device=device, dtype=torch.float32)
