"""Next-token choice: greedy, or temperature -> top-k -> top-p sampling with one RNG per sequence.

One generator per sequence makes a sequence's samples independent of what else is in its batch.
"""

from __future__ import annotations

import torch

from dynts.config import SamplingConfig


def top_k_count(config: SamplingConfig, vocab: int) -> int:
    """How many candidates top-k keeps: top_k, or the whole vocabulary when it is 0 (off) or not smaller."""
    return config.top_k if 0 < config.top_k < vocab else vocab


def nucleus_drop(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p on candidates sorted best first: True where a candidate falls outside the nucleus, i.e. the
    probability mass strictly before it already reaches top_p. The best candidate always stays."""
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    never_first = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device) > 0
    return (before >= top_p) & never_first


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus); removed entries become -inf."""
    logits = logits.float() / config.temperature
    k = top_k_count(config, logits.shape[-1])
    if k < logits.shape[-1]:
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool).scatter(
            -1, order, nucleus_drop(sorted_logits, config.top_p)
        )
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """logits [n, vocab] -> token ids [n]; generators[i] drives row i."""
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, config).softmax(dim=-1)
    picks = [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(probs.shape[0])]
    return torch.cat(picks)
