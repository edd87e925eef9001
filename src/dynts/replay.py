"""Teacher-forced replay in chunks: the evictions and logits of token-by-token decoding, with few forwards.

When every token is known in advance, nothing forces one forward per token. Between two compressions a
sequence's cache only grows, so all tokens up to the point where it next reaches the budget go through the
model in one causal forward over the cached tokens, and the compression then happens exactly where
token-by-token decoding would do it. Chunks also end where the answer starts, because tokens after the
end-of-thinking marker enter the cache protected. A 1k-token trace under B=256 takes a few dozen forwards
instead of a thousand, which is what makes `dynts fidelity` a CPU tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .engine import Engine
from .errors import DynTSError


@dataclass
class ReplayStats:
    forwards: int = 0
    compressions: int = 0


def answer_flags(token_ids: Sequence[int], think_end: Sequence[int]) -> list[bool]:
    """Per token: whether it enters the cache in the answer, as the engine flags it (from the last token of the
    end-of-thinking marker on)."""
    flags, inside, width = [], False, len(think_end)
    for i in range(len(token_ids)):
        if width and not inside and list(token_ids[max(0, i - width + 1) : i + 1]) == list(think_end):
            inside = True
        flags.append(inside)
    return flags


@torch.no_grad()
def replay(engine: Engine, prompt_ids: Sequence[int], token_ids: Sequence[int],
           on_logits: Callable[[int, torch.Tensor, int], None], max_chunk: int = 512) -> ReplayStats:
    """Feed the prompt, then token_ids teacher-forced under the engine's policy and budget.

    on_logits(first, logits, compressions) receives the logits [n, V] that token_ids[first : first + n] are
    predicted from, and how many compressions the sequence had undergone before those logits were computed.
    """
    if not token_ids:
        raise DynTSError("replay needs at least one forced token")
    if max_chunk < 1:
        raise DynTSError(f"max_chunk must be at least 1, got {max_chunk}")
    engine.check_prompts([prompt_ids])
    budget, policy = engine.budget, engine.policy
    capacity = budget.budget if budget.compresses else len(prompt_ids) + len(token_ids)
    cache = engine.new_cache(1, capacity)
    engine.last_cache = cache
    stats = ReplayStats()
    hidden = engine.feed(cache, 0, prompt_ids, is_prompt=True)
    on_logits(0, engine.lm_head(hidden[0, -1:]), 0)
    stats.forwards = 1

    flags = answer_flags(token_ids, engine.loaded.think_end_ids)
    fed, to_feed = 0, len(token_ids) - 1  # the last token is predicted, never fed
    while fed < to_feed:
        room = budget.budget - cache.lengths[0] if budget.compresses else to_feed
        n = min(room, to_feed - fed, max_chunk)
        if flags[fed] != flags[fed + n - 1]:  # end the chunk where the answer starts
            n = flags.index(True, fed) - fed
        hidden = engine.feed(cache, 0, token_ids[fed : fed + n], in_answer=flags[fed : fed + n])
        on_logits(fed + 1, engine.lm_head(hidden[0]), stats.compressions)
        stats.forwards += 1
        fed += n
        if budget.compresses and cache.lengths[0] >= budget.budget:
            cache.compact_row(0, policy.select(cache, 0))
            stats.compressions += 1
    return stats
