"""SepLLM: attention sinks, separator tokens (punctuation and newlines) and the most recent tokens.

Separators are found once per tokenizer by decoding every vocabulary entry. When more separators exist than fit,
the newest are kept; remaining room goes to the newest other tokens.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch

from dynts.errors import DynTSError
from dynts.policies.base import Policy, slot_index_scores
from dynts.policies.options import option_help

SEPARATOR_CHARS = set(".,;:!?\n")


@dataclass(frozen=True)
class SepLLMConfig:
    sinks: int = option_help("tokens at the start of the sequence (attention sinks) that are never evicted", default=4)

    def __post_init__(self):
        if self.sinks < 0:
            raise DynTSError(f"sinks must be >= 0, got {self.sinks}")


@lru_cache(maxsize=8)
def _separator_ids(tokenizer) -> tuple[int, ...]:
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        stripped = text.strip(" \t")
        if stripped and set(stripped) <= SEPARATOR_CHARS:
            ids.append(token_id)
    return tuple(ids)


def separator_ids(tokenizer) -> tuple[int, ...]:
    return _separator_ids(tokenizer)


class SepLLMPolicy(Policy):
    name = "sepllm"
    summary = "attention sinks + separator tokens (punctuation, newlines) + the newest tokens"
    Config = SepLLMConfig
    capturable = True
    SEPARATOR_BONUS = 1e7  # above any slot index, so separators win over plain recency

    def __init__(self, budget, config=None):
        super().__init__(budget, config)
        self._is_separator: torch.Tensor | None = None

    def bind(self, loaded):
        ids = separator_ids(loaded.tokenizer) if loaded.tokenizer is not None else ()
        vocab = loaded.model.config.vocab_size
        self._is_separator = torch.zeros(max(vocab, max(ids, default=0) + 1), dtype=torch.bool, device=loaded.device)
        if ids:
            self._is_separator[list(ids)] = True

    def setup(self, cache):
        cache.add_slot_buffer("separator", per_head=False, dtype=torch.bool, fill=False)

    def on_tokens(self, cache, batch):
        flags = self._is_separator[batch.token_ids]
        cache.slot["separator"][batch.rows[:, None], batch.slots] = flags

    def score_older(self, cache, row, older):
        scores = slot_index_scores(older, cache.device)
        scores = scores + cache.slot["separator"][row, :older].float() * self.SEPARATOR_BONUS
        scores[: self.config.sinks].fill_(float("inf"))  # fill_, not a Python scalar copied in: no host data
        return scores
