"""What every eviction policy shares: when to compress and how many tokens survive.

A compression of a sequence holding L tokens keeps its most recent W tokens and the k = floor(r (L - W)) best
of the older ones, in their original order (selection.py). A policy only says what "best" means by scoring the
older slots, either one score per slot (one index set for all layers and heads) or one per layer and KV head.
Slots scored +inf are protected; if more are protected than fit, the newest of them are kept and the event is
counted in `protected_overflow`.

What a policy can do is declared here, once, as class attributes; its settings are its `Config` dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dynts.config import BudgetConfig
from dynts.kv.cache import BudgetedCache
from dynts.policies.options import NoOptions
from dynts.policies.selection import keep_slots


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
    """Base eviction policy. Subclasses set the class attributes and implement `score_older`."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""  # one line on what a compression keeps (`dynts policies`)
    Config: ClassVar[type] = NoOptions  # the policy's settings, a frozen dataclass (options.py)
    compresses: ClassVar[bool] = True
    per_head: bool = False  # one index set per layer and KV head instead of one for all
    protects_prompt: bool = False  # the whole prompt must fit in what a compression keeps
    observes_attention: ClassVar[bool] = False  # wants observe_attention calls from the attention function
    wants_probs: ClassVar[bool] = False  # ... with attention probabilities computed
    allows_zero_window: ClassVar[bool] = False
    uses_head: ClassVar[bool] = False  # scores tokens with an importance head
    capturable: ClassVar[bool] = False  # no host reads in its hooks: the fast path may capture it (see is_capturable)

    def __init__(self, budget: BudgetConfig, config=None):
        self.budget = budget
        self.config = config if config is not None else self.Config()
        self._overflow: torch.Tensor | None = None

    @classmethod
    def create(cls, budget: BudgetConfig, config, **context) -> Policy:
        """Registry entry point; context (head, head_path, seed) reaches the policies that use it."""
        return cls(budget, config)

    @classmethod
    def is_capturable(cls) -> bool:
        """Whether the fast path may capture this policy's hooks in CUDA graphs. Only a class's own declaration
        counts: a subclass changes hooks, so it must say again that they read nothing back to the host."""
        return bool(cls.__dict__.get("capturable", False))

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

    def select(self, cache: BudgetedCache, row: int, budget: BudgetConfig | None = None) -> torch.Tensor:
        """Sorted slot indices to keep for one row (selection.keep_slots for a single row); budget: the row's own
        frame when it has one (a request with its own KV budget)."""
        return keep_slots(self, cache, [row], budget)[0]

    def check_budget(self, budget: BudgetConfig) -> None:
        """Raise a DynTSError when this policy cannot compress in `budget`'s frame (called for the engine's frame
        and for every per-request budget); the base policy takes any."""

    def note_overflow(self, overflowed: torch.Tensor) -> None:
        """Count rows whose protected tokens did not all fit, on the device (read only when asked for)."""
        count = overflowed.sum()
        self._overflow = count if self._overflow is None else self._overflow + count

    @property
    def protected_overflow(self) -> int:
        """Compressions so far that could not keep every protected token (a host read)."""
        return 0 if self._overflow is None else int(self._overflow)


def slot_index_scores(older: int, device) -> torch.Tensor:
    """Newer slots score higher: slots hold tokens in their original order."""
    return torch.arange(older, device=device, dtype=torch.float32)
