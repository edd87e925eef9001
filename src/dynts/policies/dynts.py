"""DynTS: keep the thinking tokens a learned importance head predicts the final answer will attend to.

Every token is scored by the head when it enters the cache (prompt tokens at prefill, generated tokens at
their decode step); prompt tokens and tokens after the end-of-thinking marker score +inf and are never
evicted. One index set is shared by all layers and heads. Ablations: `random` / `bottom` selection,
`protect_prompt=False` (dynts-noquestion), and window 0 (no local window).
"""

from dataclasses import dataclass

import torch

from dynts.errors import DynTSError
from dynts.models.importance_head import resolve_head
from dynts.policies.base import Policy
from dynts.policies.options import option_help

SELECTIONS = ("top", "random", "bottom")


@dataclass(frozen=True)
class DynTSConfig:
    selection: str = option_help(
        "which older thinking tokens survive: top (by the head), random or bottom (ablations)", default="top"
    )
    protect_prompt: bool = option_help("the prompt is never evicted (false: the no-question ablation)", default=True)

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise DynTSError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")


class DynTSPolicy(Policy):
    name = "dynts"
    summary = "the prompt, the answer after </think>, and the top thinking tokens by the importance head"
    Config = DynTSConfig
    allows_zero_window = True
    uses_head = True
    capturable = True

    def __init__(self, budget, config=None, head=None, head_path=None, seed=0):
        super().__init__(budget, config)
        self.head = head
        self.head_path = head_path  # checkpoint; None: the head shipped for the model, if any
        self.seed = seed  # the random ablation's
        self.protects_prompt = self.config.protect_prompt

    @classmethod
    def create(cls, budget, config, head=None, head_path=None, seed=0, **_):
        return cls(budget, config, head=head, head_path=head_path, seed=seed)

    def bind(self, loaded):
        if self.head is None:
            self.head = resolve_head(self.head_path, loaded)
        if self.head.config.hidden_size != loaded.hidden_size:
            raise DynTSError(
                f"importance head expects hidden size {self.head.config.hidden_size}, "
                f"model {loaded.name} has {loaded.hidden_size}"
            )
        self.head = self.head.to(loaded.device)

    def setup(self, cache):
        cache.add_slot_buffer("importance", per_head=False, dtype=torch.float32, fill=0.0)

    @torch.no_grad()
    def on_tokens(self, cache, batch):
        scores = self.head(batch.hidden).float()  # [n, q]
        protected = batch.in_answer.expand_as(scores)
        if batch.is_prompt and self.protects_prompt:
            protected = torch.ones_like(protected)
        scores = scores.masked_fill(protected, float("inf"))
        cache.slot["importance"][batch.rows[:, None], batch.slots] = scores

    def score_older(self, cache, row, older):
        scores = cache.slot["importance"][row, :older].clone()
        if self.config.selection == "top":
            return scores
        protected = torch.isposinf(scores)
        if self.config.selection == "random":
            # Seeded by the sequence's own progress, not a generator shared by the batch: a sequence draws the same
            # selection whether it is decoded alone or next to others.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cache.next_position[row])
            scores = torch.rand(older, generator=generator).to(scores.device)
        else:
            scores = -scores
        return scores.masked_fill(protected, float("inf"))
