"""DynTS with oracle scores and the eviction timeline (experiments/fidelity_diagnosis.py) on a tiny random model."""

import pytest
import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.engine.replay import replay
from dynts.errors import DynTSError
from dynts.experiments import fidelity_diagnosis as diagnosis
from dynts.experiments.fidelity import Trace, build_engines
from dynts.models.importance_head import random_head
from dynts.policies.registry import resolve_spec

BUDGET = BudgetConfig(24, 6, 0.5)


def engine(loaded, spec, head=None):
    name, options = resolve_spec(spec)
    greedy = SamplingConfig(greedy=True, max_new_tokens=1)
    return Engine(loaded, name, BUDGET, greedy, 1, head=head, policy_options=dict(options))


def kept_positions(e):
    cache = e.last_cache
    return cache.slot["position"][0, : cache.lengths[0]].tolist()


def test_oracle_ranking_by_position_keeps_what_the_prompt_window_keeps(make_tiny):
    loaded = make_tiny(vocab_size=64)
    prompt, tokens = list(range(1, 5)), [7 + i % 40 for i in range(70)]
    oracle = engine(loaded, "dynts:scores=oracle")
    oracle.policy.set_oracle(torch.arange(len(prompt) + len(tokens), dtype=torch.float32))  # newer = better
    control = engine(loaded, "window:protect_prompt=true")
    stats = replay(oracle, prompt, tokens, lambda *_: None, max_chunk=8)
    replay(control, prompt, tokens, lambda *_: None, max_chunk=8)
    assert stats.compressions >= 3
    assert kept_positions(oracle) == kept_positions(control)


def test_oracle_keeps_the_labelled_tokens_and_the_timeline_agrees(make_tiny):
    loaded = make_tiny(vocab_size=64)
    prompt, tokens = list(range(1, 5)), [7 + i % 40 for i in range(70)]
    labels = torch.zeros(len(prompt) + len(tokens))
    precious = [9, 13, 20]
    labels[precious] = 1.0
    labels[30:40] = 0.5  # the next best, some of which a compression must drop later
    oracle = engine(loaded, "dynts:scores=oracle")
    oracle.policy.set_oracle(labels)
    trace = Trace(prompt, tokens, None)
    timeline = diagnosis.eviction_timeline(oracle, trace, "oracle", max_chunk=8)
    kept = kept_positions(oracle)
    assert set(precious) <= set(kept) and set(range(len(prompt))) <= set(kept)
    assert not set(precious) & set(timeline.evicted_at)
    # every position fed and no longer cached was evicted by a recorded compression, and none that is cached was
    fed = set(range(len(prompt) + len(tokens) - 1))
    assert set(timeline.evicted_at) == fed - set(kept)
    assert len(timeline.compression_tokens) == max(timeline.evicted_at.values())
    assert timeline.compression_tokens == sorted(timeline.compression_tokens)
    # the plain head (a random one) evicts some of them: the oracle is what made the difference
    plain = engine(loaded, "dynts", head=random_head(loaded.hidden_size, seed=1))
    other = diagnosis.eviction_timeline(plain, trace, "head", max_chunk=8)
    assert len(other.compression_tokens) == len(timeline.compression_tokens)
    assert set(precious) & set(other.evicted_at)


def test_oracle_needs_its_labels(make_tiny):
    loaded = make_tiny(vocab_size=64)
    e = engine(loaded, "dynts:scores=oracle")
    with pytest.raises(DynTSError, match="set_oracle"):
        replay(e, [1, 2, 3], [5] * 30, lambda *_: None)
    e.policy.set_oracle(torch.zeros(10))
    with pytest.raises(DynTSError, match="past the labelled trace"):
        replay(e, [1, 2, 3], [5] * 30, lambda *_: None)
    with pytest.raises(DynTSError, match="scores=oracle"):
        engine(loaded, "dynts", head=random_head(loaded.hidden_size)).policy.set_oracle(torch.zeros(3))
    with pytest.raises(DynTSError, match="scores must be one of head, oracle"):
        resolve_spec("dynts:scores=truth")


def test_oracle_hook_sets_labels_only_on_oracle_engines(smollm):
    tok = smollm.tokenizer
    prompt = tok.encode("Add the numbers.", add_special_tokens=False)
    thinking = tok.encode("Two plus three is five, and five plus four is nine.\n", add_special_tokens=False)
    answer = tok.encode("\nThe answer is 9.", add_special_tokens=False)
    tokens = thinking + list(smollm.think_end_ids) + answer
    trace = Trace(prompt, tokens, len(thinking) + len(smollm.think_end_ids))
    engines = build_engines(smollm, ["dynts", "dynts:scores=oracle", "window"], [24], 6, 0.5)
    hook = diagnosis.oracle_hook(smollm, engines)
    hook(trace)
    chosen = [e for e in engines.values() if diagnosis.wants_oracle(e)]
    assert len(chosen) == 1 and chosen[0].policy.oracle.numel() == len(prompt) + len(tokens)
    labels = chosen[0].policy.oracle
    assert float(labels[len(prompt) : len(prompt) + len(thinking)].sum()) > 0
    assert diagnosis.oracle_hook(smollm, {k: v for k, v in engines.items() if not diagnosis.wants_oracle(v)}) is None


def test_recency_blend_ranks_and_its_extremes(make_tiny):
    from dynts.policies.dynts import blend_recency

    inf = float("inf")
    scores = torch.tensor([inf, 0.9, 0.1, inf, 0.5, 0.3])
    assert torch.equal(blend_recency(scores, 0.0).argsort()[:4], torch.tensor([2, 5, 4, 1]))  # the head's order
    assert torch.allclose(blend_recency(scores, 1.0)[[1, 2, 4, 5]], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert torch.isposinf(blend_recency(scores, 0.4)[[0, 3]]).all()
    # in a replay, recency=1 keeps what the prompt-protecting window keeps, whatever the head says
    loaded = make_tiny(vocab_size=64)
    prompt, tokens = list(range(1, 5)), [7 + i % 40 for i in range(70)]
    blended = engine(loaded, "dynts:recency=1", head=random_head(loaded.hidden_size, seed=2))
    control = engine(loaded, "window:protect_prompt=true")
    replay(blended, prompt, tokens, lambda *_: None, max_chunk=8)
    replay(control, prompt, tokens, lambda *_: None, max_chunk=8)
    assert kept_positions(blended) == kept_positions(control)
    plain = engine(loaded, "dynts", head=random_head(loaded.hidden_size, seed=2))
    replay(plain, prompt, tokens, lambda *_: None, max_chunk=8)
    assert kept_positions(plain) != kept_positions(control)
    for bad in ("dynts:recency=1.5", "dynts:selection=random:recency=0.5"):
        with pytest.raises(DynTSError):
            resolve_spec(bad)


def test_a_policy_with_its_own_head_runs_beside_the_runs_head(make_tiny, tmp_path):
    """dynts:head=PATH ranks with that checkpoint while plain dynts keeps the run's head, so one benchmark run
    compares two heads; the run's digest names both, and oracle scores take no head."""
    from dynts.experiments.fidelity_paper import head_digest
    from dynts.models.importance_head import head_digest as weights_digest

    loaded = make_tiny(vocab_size=64)
    shared, own = random_head(loaded.hidden_size, seed=1), random_head(loaded.hidden_size, seed=5)
    own.save(tmp_path / "own")
    specs = ["dynts", f"dynts:head={tmp_path / 'own'}"]
    engines = build_engines(loaded, specs, [24], 6, 0.5, head=shared)
    assert [label for label, _ in engines] == specs  # the option is in the label: records keep the heads apart
    digests = [weights_digest(e.policy.head) for e in engines.values()]
    assert digests == [weights_digest(shared), weights_digest(own)]
    assert head_digest(engines) == "+".join(digests)
    assert head_digest({k: v for k, v in engines.items() if k[0] == "dynts"}) == digests[0]  # one head: as before
    prompt, tokens = list(range(1, 5)), [7 + i % 40 for i in range(70)]
    kept = []
    for e in engines.values():
        replay(e, prompt, tokens, lambda *_: None, max_chunk=8)
        kept.append(kept_positions(e))
    alone = engine(loaded, "dynts", head=own)  # the same as the option's policy with that head as the run's
    replay(alone, prompt, tokens, lambda *_: None, max_chunk=8)
    assert kept[1] == kept_positions(alone) and kept[0] != kept[1]
    with pytest.raises(DynTSError, match="scores=head"):
        resolve_spec(f"dynts:scores=oracle:head={tmp_path / 'own'}")
    with pytest.raises(DynTSError, match="head"):
        build_engines(loaded, [f"dynts:head={tmp_path / 'missing'}"], [24], 6, 0.5)
