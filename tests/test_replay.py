"""Chunked teacher-forced replay equals token-by-token teacher forcing in the engine."""

import pytest
import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.engine.replay import answer_flags, replay
from dynts.errors import DynTSError
from dynts.models.importance_head import random_head
from dynts.policies import policy_class


def test_answer_flags_start_at_the_markers_last_token():
    assert answer_flags([5, 1, 2, 3, 7, 8], [1, 2, 3]) == [False, False, False, True, True, True]
    assert answer_flags([1, 2, 9, 1, 2], [1, 2]) == [False, True, True, True, True]
    assert answer_flags([4, 5], []) == [False, False]


def engine_logits(engine, prompt, tokens):
    """Log-probs [T, V] and compressions-so-far [T] of every forced token, decoded one token per step."""
    logp = torch.empty(len(tokens), engine.loaded.model.config.vocab_size)
    done = torch.empty(len(tokens), dtype=torch.long)

    def keep(seqs, steps, logits, compressions):
        for row, (step, count) in enumerate(zip(steps, compressions)):
            logp[step] = logits[row].float().log_softmax(-1)
            done[step] = count

    output = engine.generate([prompt], forced=[tokens], on_logits=keep)
    return logp, done, output.stats.compressions


def replay_logits(engine, prompt, tokens, max_chunk=512):
    logp = torch.empty(len(tokens), engine.loaded.model.config.vocab_size)
    done = torch.empty(len(tokens), dtype=torch.long)

    def keep(first, logits, compressions):
        logp[first : first + len(logits)] = logits.float().log_softmax(-1)
        done[first : first + len(logits)] = compressions

    stats = replay(engine, prompt, tokens, keep, max_chunk=max_chunk)
    return logp, done, stats


@pytest.mark.parametrize("policy", ["window", "sepllm", "h2o", "snapkv", "rkv", "dynts"])
def test_replay_matches_token_by_token_forcing(smollm, policy):
    tok = smollm.tokenizer
    prompt = tok.encode("Q: 12 cows, buys 7 more. Total?\n", add_special_tokens=False)
    tokens = tok.encode(
        " Let me think. He had 12 cows, then bought 7, and 12 plus 7 makes 19, so he has 19 cows"
        " in total now, which is the count.</think> The farmer has 19 cows. The answer is 19.",
        add_special_tokens=False,
    )
    budget = BudgetConfig(40, 8, 0.5, allow_zero_window=policy_class(policy).allows_zero_window)
    head = random_head(smollm.hidden_size, seed=3)
    engine = Engine(smollm, policy, budget, SamplingConfig(greedy=True), batch_size=1, head=head)
    expected, expected_done, expected_compressions = engine_logits(engine, prompt, tokens)
    expected_cache = engine.last_cache
    got, got_done, stats = replay_logits(engine, prompt, tokens)

    assert expected_compressions >= 3
    assert stats.compressions == expected_compressions
    assert stats.forwards <= expected_compressions + 3  # prompt, one chunk per compression, the answer boundary
    assert torch.equal(got_done, expected_done)
    assert (got - expected).abs().max() < 2e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    cache = engine.last_cache
    assert cache.lengths == expected_cache.lengths
    n = cache.lengths[0]
    assert torch.equal(cache.slot["position"][0, :n], expected_cache.slot["position"][0, :n])
    for layer, ref in zip(cache.layers, expected_cache.layers):  # per-head policies keep different slots per head
        assert torch.allclose(layer.keys[0, :, :n], ref.keys[0, :, :n], atol=1e-4)
    if policy == "dynts":  # the answer tokens entered protected in both runs
        assert torch.equal(
            torch.isposinf(cache.slot["importance"][0, :n]), torch.isposinf(expected_cache.slot["importance"][0, :n])
        )


def test_small_chunks_and_no_budget_agree(smollm):
    tok = smollm.tokenizer
    prompt = tok.encode("Count: one, two, three,", add_special_tokens=False)
    tokens = tok.encode(" four, five, six, seven, eight, nine, ten.", add_special_tokens=False)
    engine = Engine(smollm, "full", None, SamplingConfig(greedy=True), batch_size=1)
    whole, _, stats = replay_logits(engine, prompt, tokens)
    assert stats.forwards == 2 and stats.compressions == 0
    pieces, _, stats = replay_logits(engine, prompt, tokens, max_chunk=3)
    assert stats.forwards == 1 + -(-(len(tokens) - 1) // 3)
    assert (whole - pieces).abs().max() < 1e-3
    with pytest.raises(DynTSError):
        replay(engine, prompt, [], lambda *a: None)
