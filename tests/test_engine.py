"""The budgeted decode engine on the embedded real model (SmolLM2-135M, fp32, CPU) and on tiny random
Qwen2 / Qwen3 models: exactness against transformers, the budget bound, per-sequence compression,
batch invariance, prompt protection and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.models.importance_head import random_head
from dynts.models.loading import load_model
from dynts.policies import POLICIES, make_policy

BUDGET, WINDOW, RATIO = 30, 4, 0.5  # a compression keeps 4 + 13 = 17 tokens, the next comes 13 tokens later
NEW_TOKENS = 40
RAW_PROMPTS = ["Count from one to one hundred: one, two, three,", "The following is a list of fruits:"]


def make_engine(lm, name, budget=BUDGET, window=WINDOW, ratio=RATIO, new_tokens=NEW_TOKENS, batch_size=2, **kw):
    cls = POLICIES[name][0]
    config = (
        BudgetConfig(budget, window, ratio, allow_zero_window=cls.allows_zero_window)
        if cls.compresses
        else BudgetConfig(None)
    )
    head = random_head(lm.hidden_size) if name.startswith("dynts") else None
    return Engine(
        lm,
        name,
        config,
        SamplingConfig(greedy=True, max_new_tokens=new_tokens),
        batch_size,
        head=head,
        trace_steps=True,
        **kw,
    )


def expected_compressions(prompt_len, fed, budget, window, ratio):
    """Replay the B/W/r frame: (number of compressions, largest cache length) after feeding `fed` tokens."""
    length, count, peak = prompt_len, 0, prompt_len
    for _ in range(fed):
        length += 1
        peak = max(peak, length)
        if length >= budget:
            length = window + math.floor(ratio * (length - window))
            count += 1
    return count, peak


def spy_selections(engine, monkeypatch):
    """Record (rows in the batch, row, original positions kept) for every compression."""
    records = []
    original = engine.policy.select

    def select(cache, row):
        keep = original(cache, row)
        shared = keep if keep.dim() == 1 else keep[0, 0]
        positions = cache.slot["position"][row, : cache.lengths[row]]
        records.append((len(cache.lengths), row, positions[shared].tolist(), positions.tolist()))
        return keep

    monkeypatch.setattr(engine.policy, "select", select)
    return records


def check_layer0_keys(lm, engine, prompts, results):
    """Layer-0 keys depend only on a token and its original position, so every cached key must equal the key of
    the same position in a plain forward over the whole sequence: compaction moved the right keys, kept their
    RoPE positions, and the position buffer follows them. Per-head policies: head 0 (the position buffer
    follows the first head's selection)."""
    cache = engine.last_cache
    assert len(cache.lengths) == len(prompts)
    for row, (prompt, result) in enumerate(zip(prompts, results)):
        fed = prompt + result.token_ids[:-1]
        with torch.no_grad():
            full = lm.model(torch.tensor([fed]), use_cache=True).past_key_values
        full_keys = full.layers[0].keys[0]  # [kv_heads, L, d]
        length = cache.lengths[row]
        positions = cache.slot["position"][row, :length]
        assert positions.tolist() == sorted(set(positions.tolist())), "kept tokens keep their original order"
        window = engine.budget.window
        if window:
            assert positions[-window:].tolist() == list(range(len(fed) - window, len(fed)))
        else:
            assert positions.tolist() == list(range(len(fed)))
        got = cache.layers[0].keys[row, :, :length]
        want = full_keys[:, positions]
        heads = slice(0, 1) if engine.policy.per_head else slice(None)
        torch.testing.assert_close(got[heads], want[heads], atol=1e-4, rtol=1e-4)


# --- exactness ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_matches_transformers_generate(smollm):
    lm = smollm
    prompts = ["Write a poem about the sea.", "Explain in detail how a rainbow forms, step by step, for a child."]
    engine = make_engine(lm, "full", new_tokens=64)
    out = engine.generate(prompts)
    ids = [engine.encode(p) for p in prompts]
    assert len(ids[0]) != len(ids[1])
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_token_ids[0]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    with torch.no_grad():
        hf = lm.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=64,
            pad_token_id=pad,
            eos_token_id=list(lm.eos_token_ids),
        )
    eos = set(lm.eos_token_ids)
    for row, result in enumerate(out.results):
        expected = []
        for token in hf[row, width:].tolist():
            expected.append(token)
            if token in eos:
                break
        assert result.token_ids == expected
        assert result.prompt_tokens == len(ids[row])
        assert result.stats.compressions == 0
        assert result.stats.peak_kv_tokens == len(ids[row]) + len(expected) - 1
    assert max(len(r.token_ids) for r in out.results) == 64


# --- every policy under a budget -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_budget_batching_and_invariance(smollm, name, monkeypatch):
    lm = smollm
    prompts = [lm.tokenizer.encode(p) for p in RAW_PROMPTS]
    assert len(prompts[0]) != len(prompts[1])
    engine = make_engine(lm, name)
    records = spy_selections(engine, monkeypatch) if engine.budget.compresses else []
    out = engine.generate(prompts)
    results = out.results
    compresses = engine.budget.compresses
    lengths = [len(r.token_ids) for r in results]

    # the budget holds for every sequence and at every step
    for prompt, r in zip(prompts, results):
        assert r.stats.generated_tokens == len(r.token_ids) <= NEW_TOKENS
        assert r.stats.finish_reason == ("eos" if r.token_ids[-1] in lm.eos_token_ids else "length")
        fed = len(r.token_ids) - 1
        if compresses:
            count, peak = expected_compressions(len(prompt), fed, BUDGET, WINDOW, RATIO)
            assert r.stats.peak_kv_tokens == peak <= BUDGET
            assert r.stats.compressions == count >= 1
        else:
            assert r.stats.compressions == 0
            assert r.stats.peak_kv_tokens == len(prompt) + fed
    steps = out.stats.steps
    assert len(steps) == max(lengths) - 1
    for s in steps:
        assert s["active"] == sum(n - 1 > s["step"] for n in lengths)
        if compresses:
            assert s["kv_tokens"] <= BUDGET * s["active"]
    assert out.stats.compressions == sum(r.stats.compressions for r in results)

    # each sequence compresses when its own cache is full: different prompt lengths, different steps
    when = [[s["step"] for s in steps if seq in s["compressed"]] for seq in range(2)]
    assert [len(w) for w in when] == [r.stats.compressions for r in results]
    if compresses:
        assert set(when[0]).isdisjoint(when[1])
        assert when[0][0] == BUDGET - len(prompts[0]) - 1 and when[1][0] == BUDGET - len(prompts[1]) - 1

    # every compression kept W + floor(r (B - W)) tokens in order; DynTS never drops the prompt
    last = max(range(2), key=lambda i: lengths[i])  # the sequence left when the other one stopped
    for rows, row, kept, before in records:
        seq = row if rows == 2 else last
        assert len(before) == BUDGET
        assert len(kept) == WINDOW + math.floor(RATIO * (BUDGET - WINDOW))
        assert kept == sorted(kept) and kept[-WINDOW:] == before[-WINDOW:]
        if engine.policy.protects_prompt:
            assert kept[: len(prompts[seq])] == list(range(len(prompts[seq])))
        if name == "window":
            assert kept == before[-len(kept) :]
        if name == "streaming":
            assert kept[:10] == list(range(10))
    final = [i for i in range(2) if lengths[i] == max(lengths)]  # the rows still in the last cache
    check_layer0_keys(lm, engine, [prompts[i] for i in final], [results[i] for i in final])

    # a sequence decoded alone gives the same tokens as inside the batch (fp32, greedy)
    for prompt, r in zip(prompts, results):
        alone = engine.generate([prompt]).results[0]
        assert alone.token_ids == r.token_ids
        assert alone.stats.compressions == r.stats.compressions
        assert alone.stats.peak_kv_tokens == r.stats.peak_kv_tokens


@pytest.mark.slow
def test_dynts_prompt_protection_and_noquestion_ablation(smollm, monkeypatch):
    """With B=20, W=4, r=0.25 a compression keeps only 4 older tokens: dynts refuses a 13-token prompt, and the
    noquestion ablation (prompt not protected) must evict prompt tokens."""
    lm = smollm
    prompt = lm.tokenizer.encode(RAW_PROMPTS[0])
    assert len(prompt) == 13
    with pytest.raises(DynTSError, match="floor"):
        make_engine(lm, "dynts", budget=20, ratio=0.25, new_tokens=16).generate([prompt])
    engine = make_engine(lm, "dynts-noquestion", budget=20, ratio=0.25, new_tokens=16)
    records = spy_selections(engine, monkeypatch)
    out = engine.generate([prompt])
    assert out.results[0].stats.compressions >= 1
    assert records
    for _, _, kept, _ in records:
        assert len(kept) == 8
        assert not set(range(13)) <= set(kept)


@pytest.mark.slow
def test_dynts_without_local_window(smollm):
    lm = smollm
    prompt = lm.tokenizer.encode(RAW_PROMPTS[1])
    engine = make_engine(lm, "dynts", budget=24, window=0, ratio=0.5, new_tokens=30, batch_size=1)
    out = engine.generate([prompt])
    count, peak = expected_compressions(len(prompt), 29, 24, 0, 0.5)
    assert out.results[0].stats.compressions == count >= 2
    assert out.results[0].stats.peak_kv_tokens == peak
    positions = engine.last_cache.slot["position"][0, : engine.last_cache.lengths[0]].tolist()
    assert positions[: len(prompt)] == list(range(len(prompt)))


# --- tiny random Qwen2 / Qwen3 ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
@pytest.mark.parametrize("name", ["window", "h2o", "snapkv", "rkv", "dynts"])
def test_tiny_qwen_models_compress(smollm, make_tiny, kind, name):
    lm = make_tiny(kind, vocab_size=len(smollm.tokenizer), seed=7, name=f"tiny-{kind}", tokenizer=smollm.tokenizer)
    assert lm.model.config.model_type == kind
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (10, 6)]
    engine = make_engine(lm, name, new_tokens=40)
    out = engine.generate(prompts)
    for prompt, r in zip(prompts, out.results):
        count, peak = expected_compressions(len(prompt), len(r.token_ids) - 1, BUDGET, WINDOW, RATIO)
        assert r.stats.compressions == count >= 1
        assert r.stats.peak_kv_tokens == peak <= BUDGET
        assert isinstance(r.text, str)
    assert all(s["kv_tokens"] <= BUDGET * s["active"] for s in out.stats.steps)
    check_layer0_keys(lm, engine, prompts, out.results)
    for prompt, r in zip(prompts, out.results):
        assert engine.generate([prompt]).results[0].token_ids == r.token_ids


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "budget,window,ratio",
    [(32, 32, 0.5), (32, 40, 0.5), (32, 4, 0.0), (32, 4, -0.1), (32, 4, 1.5), (32, 4, float("nan")), (0, 0, 0.5)],
)
def test_bad_budget_frame(budget, window, ratio):
    with pytest.raises(DynTSError):
        BudgetConfig(budget, window, ratio)


@pytest.mark.slow
def test_window_zero_only_for_dynts(smollm):
    with pytest.raises(DynTSError, match="window"):
        BudgetConfig(32, 0, 0.5)
    with pytest.raises(DynTSError, match="window 0"):
        Engine(smollm, "window", BudgetConfig(32, 0, 0.5, allow_zero_window=True))
    Engine(smollm, "dynts", BudgetConfig(32, 0, 0.5, allow_zero_window=True), head=random_head(576))


@pytest.mark.slow
def test_prompt_must_fit_budget(smollm):
    prompt = smollm.tokenizer.encode(RAW_PROMPTS[0])  # 13 tokens
    with pytest.raises(DynTSError, match="does not fit"):
        make_engine(smollm, "window", budget=17, window=4).generate([prompt])
    with pytest.raises(DynTSError, match="does not fit"):
        make_engine(smollm, "h2o", budget=16, window=3).generate([prompt])
    # dynts protects the prompt: 13 > floor(0.5 * (28 - 4)) = 12
    with pytest.raises(DynTSError, match="12"):
        make_engine(smollm, "dynts", budget=28, window=4).generate([prompt])
    make_engine(smollm, "window", budget=28, window=4, new_tokens=1).generate([prompt])  # no protection: fits
    with pytest.raises(DynTSError, match="empty"):
        make_engine(smollm, "window").generate([[]])


@pytest.mark.slow
def test_unknown_policy_and_model(smollm):
    with pytest.raises(DynTSError, match="unknown policy"):
        Engine(smollm, "lru", BudgetConfig(32, 4, 0.5))
    with pytest.raises(DynTSError, match="unknown policy"):
        make_policy("lru", BudgetConfig(32, 4, 0.5))
    with pytest.raises(DynTSError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(DynTSError):
        load_model("/nonexistent/dir/model")
    with pytest.raises(DynTSError):
        load_model("missing.gguf")


@pytest.mark.slow
def test_dynts_head_problems(smollm, make_tiny):
    tiny = make_tiny("qwen2", name="tiny-qwen2")
    with pytest.raises(DynTSError, match="needs an importance head"):
        Engine(tiny, "dynts", BudgetConfig(32, 4, 0.5))
    with pytest.raises(DynTSError, match="hidden size"):
        Engine(smollm, "dynts", BudgetConfig(32, 4, 0.5), head=random_head(64))
    with pytest.raises(DynTSError):
        Engine(smollm, "dynts", BudgetConfig(32, 4, 0.5), head_path="/nonexistent/head")


@pytest.mark.slow
def test_bad_sampling_and_batch(smollm):
    with pytest.raises(DynTSError):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(DynTSError):
        SamplingConfig(temperature=0.0)
    with pytest.raises(DynTSError):
        SamplingConfig(top_p=1.5)
    with pytest.raises(DynTSError):
        Engine(smollm, "full", batch_size=0)


# --- tokens after the end-of-thinking marker --------------------------------------------------------------
def test_answer_tokens_are_protected_and_overflow_counted(make_tiny):
    """Tokens from the end-of-thinking marker on score +inf. When more are protected than a compression keeps,
    the newest protected ones stay, the budget still holds, and the run counts the overflow (per run, not
    cumulatively over an engine's runs)."""
    import dataclasses

    lm = make_tiny("llama", vocab_size=128, seed=5)
    prompt = list(range(10, 16))
    first = Engine(lm, "full", None, SamplingConfig(greedy=True, max_new_tokens=1)).generate([prompt])
    marker = first.results[0].token_ids[0]
    lm = dataclasses.replace(lm, think_end_ids=(marker,))  # the first generated token ends the thinking
    engine = make_engine(lm, "dynts", budget=20, window=4, ratio=0.5, new_tokens=30, batch_size=1)
    out = engine.generate([prompt])
    stats = out.results[0].stats
    assert stats.compressions == expected_compressions(6, 29, 20, 4, 0.5)[0] >= 2
    assert stats.peak_kv_tokens == 20
    importance = engine.last_cache.slot["importance"][0, : engine.last_cache.lengths[0]]
    assert torch.all(torch.isposinf(importance))
    # every compression had 16 protected older tokens for 8 places: the newest 8 + window stayed
    assert out.stats.protected_overflow == stats.compressions
    positions = engine.last_cache.slot["position"][0, : engine.last_cache.lengths[0]].tolist()
    fed = 6 + 29
    assert positions == list(range(fed - len(positions), fed))
    again = engine.generate([prompt])
    assert again.stats.protected_overflow == out.stats.protected_overflow


@pytest.mark.parametrize("name", ["h2o", "snapkv", "rkv", "dynts"])
def test_finished_sequences_leave_the_batch_cleanly(make_tiny, name):
    """When one sequence stops early its cache row is dropped; the others' keys, slot scores and per-row
    state (recent queries) must stay with them, so their tokens do not change."""
    import dataclasses

    lm = make_tiny("llama", vocab_size=128, seed=9)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (7, 10, 5)]
    reference = make_engine(lm, name, budget=24, window=4, new_tokens=40, batch_size=3).generate(prompts).results
    # a token the middle sequence produces mid-way and the others never do becomes the end-of-sequence token
    others = set(reference[0].token_ids) | set(reference[2].token_ids)
    stop_at = next(
        i
        for i, t in enumerate(reference[1].token_ids)
        if i >= 5 and t not in others and t not in reference[1].token_ids[:i]
    )
    stop = reference[1].token_ids[stop_at]
    lm = dataclasses.replace(lm, eos_token_ids=(stop,))
    out = make_engine(lm, name, budget=24, window=4, new_tokens=40, batch_size=3).generate(prompts).results
    assert out[1].token_ids == reference[1].token_ids[: stop_at + 1] and out[1].stats.finish_reason == "eos"
    for i in (0, 2):
        assert out[i].token_ids == reference[i].token_ids
        assert out[i].stats.compressions == reference[i].stats.compressions >= 2


def test_dropped_cache_is_freed_without_garbage_collection():
    """Layers must not keep their cache alive through a reference cycle: long runs build thousands of caches,
    and cycles held their keys until a gc pass (the fidelity tool grew to 6 GiB)."""
    import gc
    import weakref

    from dynts.kv.cache import BudgetedCache

    gc.disable()
    try:
        cache = BudgetedCache(num_layers=2, batch_size=1, capacity=8)
        cache.plan_prefill(0, 3)
        cache.layers[0].update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
        alive = weakref.ref(cache)
        del cache
        assert alive() is None
    finally:
        gc.enable()
