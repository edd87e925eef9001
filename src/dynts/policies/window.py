"""Window: keep only the most recent W + floor(r (L - W)) tokens.

protect_prompt=true is the control the DynTS reference code also runs (its "question" sink): the prompt is never
evicted and the rest of what a compression keeps is the newest tokens. Next to DynTS, which protects the prompt
too, it tells what prompt protection alone gives from what the importance head adds.
"""

from dataclasses import dataclass

import torch

from dynts.policies.base import Policy, slot_index_scores
from dynts.policies.options import option_help


@dataclass(frozen=True)
class WindowConfig:
    protect_prompt: bool = option_help(
        "never evict the prompt; the rest is the newest tokens (the prompt-protection control for dynts)",
        default=False,
    )


class WindowPolicy(Policy):
    name = "window"
    summary = "the newest W + floor(r (L - W)) tokens (with protect_prompt: the prompt + the newest)"
    Config = WindowConfig
    capturable = True

    def __init__(self, budget, config=None):
        super().__init__(budget, config)
        self.protects_prompt = self.config.protect_prompt

    def setup(self, cache):
        if self.protects_prompt:
            cache.add_slot_buffer("prompt", per_head=False, dtype=torch.bool, fill=False)

    def on_tokens(self, cache, batch):
        # Only prompt tokens are marked: every other slot holds the fill (False) from allocation or compaction.
        if self.protects_prompt and batch.is_prompt:
            cache.slot["prompt"][batch.rows[:, None], batch.slots] = True

    def score_older(self, cache, row, older):
        scores = slot_index_scores(older, cache.device)
        if self.protects_prompt:
            scores = scores.masked_fill(cache.slot["prompt"][row, :older], float("inf"))
        return scores
