"""Teacher-forced replay in chunks: the evictions and logits of token-by-token decoding, with few forwards.

When every token is known in advance, nothing forces one forward per token. Between two compressions a
sequence's cache only grows, so all tokens up to the point where it next reaches the budget go through the
model in one causal forward over the cached tokens, and the compression then happens exactly where
token-by-token decoding would do it. Chunks also end where the answer starts, because tokens after the
end-of-thinking marker enter the cache protected. A 1k-token trace under B=256 takes a few dozen forwards
instead of a thousand, which is what makes `dynts fidelity` a CPU tool.

Until a sequence first reaches its budget, every policy's cache holds exactly what the full cache holds. A
full-cache run can therefore record its runs (keys, values, queries, hidden states) and hand them to each
policy as a prefix: the policy scores and observes those tokens as if it had computed them, and its own
forwards start at its first compression.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.kv.attention import StepContext, attention_probs


@dataclass
class TokenRun:
    """A run of tokens that entered a row in one forward, as a full-cache replay computed it."""

    token_ids: list[int]
    is_prompt: bool
    in_answer: list[bool]
    hidden: torch.Tensor  # [1, n, hidden]
    keys: list[torch.Tensor]  # per layer [kv_heads, n, head_dim]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]  # per layer [heads, n, head_dim], after RoPE


@dataclass
class ReplayStats:
    forwards: int = 0
    compressions: int = 0
    shared: int = 0  # forced tokens taken from a recorded prefix instead of computed
    runs: list[TokenRun] = field(default_factory=list)  # recorded runs (record_until)


class _QueryRecorder:
    """Keeps the queries of the current forward, per layer."""

    observes_attention = True
    wants_probs = False

    def __init__(self):
        self.queries: dict[int, torch.Tensor] = {}

    def observe_attention(self, layer_idx, query, key, probs, ctx):
        self.queries[layer_idx] = query[0]


def answer_flags(token_ids: Sequence[int], think_end: Sequence[int]) -> list[bool]:
    """Per token: whether it enters the cache in the answer, as the engine flags it (from the last token of the
    end-of-thinking marker on)."""
    flags, inside, width = [], False, len(think_end)
    for i in range(len(token_ids)):
        if width and not inside and list(token_ids[max(0, i - width + 1) : i + 1]) == list(think_end):
            inside = True
        flags.append(inside)
    return flags


def admit(engine: Engine, cache, row: int, run: TokenRun) -> None:
    """Put a recorded run into a row without the model: keys and values are written, and the policy observes
    and scores the tokens exactly as in a forward of its own."""
    n = len(run.token_ids)
    positions = engine.plan_run(cache, row, n)
    policy = engine.policy
    observer = policy if policy.observes_attention else None
    ctx = StepContext(prefill_row=row, observer=observer, cache=cache, positions=positions)
    for i, layer in enumerate(cache.layers):
        keys, _ = layer.update(run.keys[i][None], run.values[i][None])
        if observer is not None:
            query = run.queries[i][None]
            probs = (
                attention_probs(query, keys, None, query.shape[-1] ** -0.5, causal=True)
                if observer.wants_probs
                else None
            )
            observer.observe_attention(i, query, keys, probs, ctx)
    tokens = torch.tensor([run.token_ids], device=engine.device)
    engine.admit_run(cache, row, tokens, positions, run.hidden, run.is_prompt, run.in_answer)


@torch.no_grad()
def replay(
    engine: Engine,
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    on_logits: Callable[[int, torch.Tensor, int], None],
    max_chunk: int = 512,
    prefix: Sequence[TokenRun] = (),
    stops: Sequence[int] = (),
    record_until: int = 0,
) -> ReplayStats:
    """Feed the prompt, then token_ids teacher-forced under the engine's policy and budget.

    on_logits(first, logits, compressions) receives the logits [n, V] that token_ids[first : first + n] are
    predicted from, and how many compressions the sequence had undergone before those logits were computed.
    prefix: runs recorded by a full-cache replay of the same trace (the prompt first), admitted instead of
    computed; no logits are reported for them (they are the full cache's). stops: forced-token counts where a
    run must end (so a recording can serve budgets that compress there). record_until: record the runs while the
    cache holds fewer tokens than this (to be a prefix for others).
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
    recorder = _QueryRecorder() if record_until else None

    def run_tokens(ids, is_prompt, in_answer):
        recording = recorder is not None and cache.lengths[0] < record_until
        hidden = engine.feed(
            cache, 0, ids, is_prompt=is_prompt, in_answer=in_answer, observer=recorder if recording else None
        )
        stats.forwards += 1
        if recording:
            end = cache.lengths[0]
            layers = range(len(cache.layers))
            stats.runs.append(
                TokenRun(
                    list(ids),
                    is_prompt,
                    list(in_answer or [False] * len(ids)),
                    hidden,
                    [cache.layers[i].keys[0, :, end - len(ids) : end].clone() for i in layers],
                    [cache.layers[i].values[0, :, end - len(ids) : end].clone() for i in layers],
                    [recorder.queries[i] for i in layers],
                )
            )
        return hidden

    def compress_if_full():
        if budget.reached(cache.lengths[0]):
            cache.compact_row(0, policy.select(cache, 0))
            stats.compressions += 1

    flags = answer_flags(token_ids, engine.loaded.think_end_ids)
    fed, to_feed = 0, len(token_ids) - 1  # the last token is predicted, never fed
    if prefix:
        for run in prefix:
            admit(engine, cache, 0, run)
            fed += 0 if run.is_prompt else len(run.token_ids)
        stats.shared = fed
        compress_if_full()
    else:
        hidden = run_tokens(prompt_ids, True, None)
        on_logits(0, engine.lm_head(hidden[0, -1:]), 0)
    stops = sorted(s for s in set(stops) if 0 < s)
    while fed < to_feed:
        room = budget.budget - cache.lengths[0] if budget.compresses else to_feed
        n = min([room, to_feed - fed, max_chunk] + [s - fed for s in stops if s > fed])
        if flags[fed] != flags[fed + n - 1]:  # end the chunk where the answer starts
            n = flags.index(True, fed) - fed
        hidden = run_tokens(token_ids[fed : fed + n], False, flags[fed : fed + n])
        on_logits(fed + 1, engine.lm_head(hidden[0]), stats.compressions)
        fed += n
        compress_if_full()
    return stats
