"""Eviction policies on hand-built caches (no real model): each test would fail for a plausible wrong
implementation of the policy it checks. Tokens are fed through the registered attention function, so the
policies see queries and attention exactly as they do inside a model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.kv.attention import StepContext, dynts_attention
from dynts.kv.cache import BudgetedCache
from dynts.models.importance_head import random_head
from dynts.policies import POLICIES, TokenBatch, make_policy
from dynts.policies.options import parse_spec
from dynts.policies.rkv import redundancy
from dynts.policies.sepllm import separator_ids

HIDDEN = 16


class VocabTokenizer:
    """A tokenizer over a fixed list of token strings (for SepLLM's separator scan)."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def __len__(self):
        return len(self.pieces)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


# token 1 is ".", token 2 is "\n", token 3 is " ,"; everything else is a word
PIECES = ["<s>", ".", "\n", " ,", " a.", "...", "!?"] + [f" w{i}" for i in range(33)]
SEPARATORS = {1, 2, 3, 5, 6}


def fake_loaded(q_heads=4):
    model = SimpleNamespace(config=SimpleNamespace(num_attention_heads=q_heads, vocab_size=len(PIECES)))
    return SimpleNamespace(
        name="fake", model=model, tokenizer=VocabTokenizer(PIECES), device=torch.device("cpu"), hidden_size=HIDDEN
    )


class Layer:
    def __init__(self, idx):
        self.layer_idx = idx


class Driver:
    """Feeds tokens (queries, keys, values, hidden states, ids) into a BudgetedCache the way the engine does."""

    def __init__(self, policy, rows=1, layers=2, q_heads=4, kv_heads=2, head_dim=8, seed=0):
        self.policy = policy
        self.layers, self.q_heads, self.kv_heads, self.head_dim = layers, q_heads, kv_heads, head_dim
        self.gen = torch.Generator().manual_seed(seed)
        policy.bind(fake_loaded(q_heads))
        capacity = policy.budget.budget
        self.cache = BudgetedCache(layers, rows, capacity)
        self.cache.add_slot_buffer("position", per_head=False, dtype=torch.long, fill=-1)
        policy.setup(self.cache)
        self.observer = policy if policy.observes_attention else None

    def _rand(self, *shape):
        return torch.randn(*shape, generator=self.gen)

    def _forward(self, q, k, v, ctx):
        for i, layer in enumerate(self.cache.layers):
            kk, vv = layer.update(k, v)
            dynts_attention(Layer(i), q, kk, vv, None, dynts_ctx=ctx)

    def prefill(self, row, n, *, q=None, k=None, token_ids=None, hidden=None):
        q = self._rand(1, self.q_heads, n, self.head_dim) if q is None else q
        k = self._rand(1, self.kv_heads, n, self.head_dim) if k is None else k
        v = self._rand(1, self.kv_heads, n, self.head_dim)
        token_ids = torch.randint(7, len(PIECES), (1, n), generator=self.gen) if token_ids is None else token_ids
        hidden = self._rand(1, n, HIDDEN) if hidden is None else hidden
        positions = torch.arange(n)[None]
        self.cache.plan_prefill(row, n)
        self._forward(
            q, k, v, StepContext(prefill_row=row, observer=self.observer, cache=self.cache, positions=positions[0])
        )
        self.cache.finish_step()
        self.cache.slot["position"][row, :n] = positions[0]
        self.policy.on_tokens(
            self.cache,
            TokenBatch(
                rows=torch.tensor([row]),
                slots=positions,
                positions=positions,
                token_ids=token_ids,
                hidden=hidden,
                is_prompt=True,
                in_answer=torch.zeros(1, n, dtype=torch.bool),
            ),
        )

    def step(self, *, q=None, k=None, token_ids=None, hidden=None, in_answer=None):
        """One decode token for every row."""
        b = len(self.cache.lengths)
        q = self._rand(b, self.q_heads, 1, self.head_dim) if q is None else q
        k = self._rand(b, self.kv_heads, 1, self.head_dim) if k is None else k
        v = self._rand(b, self.kv_heads, 1, self.head_dim)
        token_ids = torch.randint(7, len(PIECES), (b, 1), generator=self.gen) if token_ids is None else token_ids
        hidden = self._rand(b, 1, HIDDEN) if hidden is None else hidden
        in_answer = torch.zeros(b, 1, dtype=torch.bool) if in_answer is None else in_answer
        slots = torch.tensor(self.cache.lengths)
        positions = torch.tensor(self.cache.next_position)
        mask = self.cache.plan_decode()
        self._forward(q, k, v, StepContext(mask=mask, observer=self.observer, cache=self.cache, positions=positions))
        self.cache.finish_step()
        self.cache.slot["position"][torch.arange(b), slots] = positions
        self.policy.on_tokens(
            self.cache,
            TokenBatch(
                rows=torch.arange(b),
                slots=slots[:, None],
                positions=positions[:, None],
                token_ids=token_ids,
                hidden=hidden,
                is_prompt=False,
                in_answer=in_answer,
            ),
        )

    def compress(self, row=0):
        keep = self.policy.select(self.cache, row)
        self.cache.compact_row(row, keep)
        return keep

    def positions(self, row=0):
        return self.cache.slot["position"][row, : self.cache.lengths[row]].tolist()


def policy(spec, budget, window, ratio, **context):
    """A policy from NAME or NAME:KEY=VALUE... under B / W / r; context (head, seed) reaches the dynts policies."""
    name, options = parse_spec(spec)
    cls = POLICIES[name][0]
    config = BudgetConfig(budget, window, ratio, allow_zero_window=cls.allows_zero_window)
    if name.startswith("dynts"):
        context.setdefault("head", random_head(HIDDEN))
    return make_policy(name, config, options, **context)


COMPRESSING = [name for name, (cls, _) in POLICIES.items() if cls.compresses]
VARIANTS = [
    "h2o:scope=shared",
    "snapkv:scope=shared",
    "rkv:scope=shared",
    "window:protect_prompt=true",
    "dynts-random:keep_protected=true",
    "dynts-bottom:keep_protected=true",
]


# --- the frame every policy shares ---------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPRESSING + VARIANTS)
def test_kept_count_order_and_window(name):
    """Every compression keeps W + floor(r (L - W)) sorted slots ending with the W newest, per row."""
    budget, window, ratio = 40, 6, 0.45
    drv = Driver(policy(name, budget, window, ratio), rows=2)
    drv.prefill(0, 3)
    drv.prefill(1, 9)
    compressions = [0, 0]
    for _ in range(90):
        drv.step()
        for row, length in enumerate(drv.cache.lengths):
            if length < budget:
                continue
            before = drv.positions(row)
            keep = drv.policy.select(drv.cache, row)
            k = math.floor(ratio * (length - window))
            assert keep.shape[-1] == window + k
            if keep.dim() == 1:
                keep_sets = [keep]
            else:
                assert keep.shape[:-1] == (drv.layers, drv.kv_heads)
                keep_sets = list(keep.reshape(-1, keep.shape[-1]))
            for ks in keep_sets:
                assert torch.all(ks[1:] > ks[:-1]), "kept slots must be sorted and distinct"
                assert int(ks[0]) >= 0 and int(ks[-1]) == length - 1
                assert ks[-window:].tolist() == list(range(length - window, length))
            drv.cache.compact_row(row, keep)
            assert drv.cache.lengths[row] == window + k
            shared = keep if keep.dim() == 1 else keep[0, 0]
            assert drv.positions(row) == [before[i] for i in shared.tolist()]
            compressions[row] += 1
    assert min(compressions) >= 3
    assert drv.cache.next_position == [3 + 90, 9 + 90]


def test_zero_window_dynts_keeps_floor_r_L():
    pol = policy("dynts", 20, 0, 0.5)
    drv = Driver(pol)
    drv.prefill(0, 4)
    for _ in range(15):
        drv.step()
    assert drv.cache.lengths[0] == 19
    drv.step()
    keep = drv.compress()
    assert keep.shape == (10,)
    assert keep[:4].tolist() == [0, 1, 2, 3]  # the prompt is protected even without a window


def test_zero_window_refused_for_baselines():
    for name in ("window", "h2o", "snapkv"):
        with pytest.raises(DynTSError):
            policy(name, 20, 0, 0.5)


# --- Window / StreamingLLM / SepLLM ----------------------------------------------------------------------
def test_window_keeps_exactly_the_newest():
    budget, window, ratio = 30, 5, 0.4
    drv = Driver(policy("window", budget, window, ratio))
    drv.prefill(0, 7)
    fed = 7
    for _ in range(3):
        while drv.cache.lengths[0] < budget:
            drv.step()
            fed += 1
        keep = drv.compress()
        n = window + math.floor(ratio * (budget - window))
        assert keep.tolist() == list(range(budget - n, budget))
        assert drv.positions() == list(range(fed - n, fed))


def test_window_protect_prompt_keeps_the_prompt_and_the_newest():
    """The prompt-protection control: the prompt survives every compression, the rest of what a compression keeps
    is the newest tokens, the same total as Window."""
    budget, window, ratio = 30, 5, 0.4  # keeps 5 + 10
    drv = Driver(policy("window:protect_prompt=true", budget, window, ratio))
    assert drv.policy.protects_prompt and not policy("window", budget, window, ratio).protects_prompt
    drv.prefill(0, 4)
    fed = 4
    for _ in range(3):
        while drv.cache.lengths[0] < budget:
            drv.step()
            fed += 1
        drv.compress()
        n = window + math.floor(ratio * (budget - window))
        assert drv.positions() == list(range(4)) + list(range(fed - (n - 4), fed))


def test_window_protect_prompt_needs_the_prompt_to_fit(make_tiny):
    """A policy that protects the prompt gets the budget check prompt <= floor(r (B - W)) (here 10)."""
    lm = make_tiny("llama", vocab_size=128)
    budget = BudgetConfig(30, 5, 0.4)
    protecting = Engine(lm, "window", budget, SamplingConfig(greedy=True), policy_options={"protect_prompt": True})
    protecting.check_prompts([list(range(3, 13))])
    with pytest.raises(DynTSError, match="floor"):
        protecting.check_prompts([list(range(3, 14))])
    Engine(lm, "window", budget, SamplingConfig(greedy=True)).check_prompts([list(range(3, 14))])


def test_streaming_keeps_sinks_across_compressions():
    budget, window, ratio = 40, 4, 0.5
    drv = Driver(make_policy("streaming", BudgetConfig(budget, window, ratio)))
    drv.prefill(0, 12)
    fed = 12
    for _ in range(4):
        while drv.cache.lengths[0] < budget:
            drv.step()
            fed += 1
        drv.compress()
        n = window + math.floor(ratio * (budget - window))
        assert drv.positions() == list(range(10)) + list(range(fed - (n - 10), fed))


def test_streaming_refuses_sinks_that_do_not_fit():
    with pytest.raises(DynTSError):
        make_policy("streaming", BudgetConfig(20, 4, 0.5))  # keeps 8 older tokens < 10 sinks


def test_separator_scan():
    assert set(separator_ids(VocabTokenizer(PIECES))) == SEPARATORS


def test_sepllm_prefers_separators_then_recency():
    budget, window, ratio = 30, 4, 0.5  # keeps 13 older tokens
    drv = Driver(policy("sepllm", budget, window, ratio))
    prompt = torch.tensor([[0, 8, 9, 1, 10, 11]])  # "." at position 3
    drv.prefill(0, 6, token_ids=prompt)
    ids = prompt[0].tolist()
    sep_positions = {3}
    while drv.cache.lengths[0] < budget:
        pos = drv.cache.next_position[0]
        token = 2 if pos % 5 == 0 else (3 if pos % 7 == 0 else 12 + pos % 20)
        ids.append(token)
        if token in SEPARATORS:
            sep_positions.add(pos)
        drv.step(token_ids=torch.tensor([[token]]))
    older = budget - window
    kept = drv.compress()[:-window].tolist()
    sinks = set(range(4))
    seps = {p for p in sep_positions if p < older} - sinks
    rest = 13 - len(sinks) - len(seps)
    assert rest > 0
    plain = [p for p in range(older) if p not in sinks and p not in seps]
    assert set(kept) == sinks | seps | set(plain[-rest:])


# --- H2O -----------------------------------------------------------------------------------------------
def test_h2o_matches_brute_force_attention(make_tiny):
    """Accumulated H2O scores equal the sum of eager attention probabilities over every query that was fed
    (prompt and decode), summed over each KV group's query heads; padded slots of the shorter row get nothing."""
    lm = make_tiny("llama", vocab_size=128, seed=1)
    engine = Engine(lm, "h2o", BudgetConfig(64, 4, 0.5), SamplingConfig(greedy=True, max_new_tokens=12), batch_size=2)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (9, 16)]
    out = engine.generate(prompts)
    cache = engine.last_cache
    assert all(r.stats.compressions == 0 for r in out.results)
    model = lm.model
    model.set_attn_implementation("eager")
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    for row, (prompt, result) in enumerate(zip(prompts, out.results)):
        fed = prompt + result.token_ids[:-1]  # the last generated token never enters the cache
        assert cache.lengths[row] == len(fed)
        with torch.no_grad():
            attentions = model(torch.tensor([fed]), output_attentions=True).attentions
        for layer_idx, probs in enumerate(attentions):
            expected = probs[0].sum(dim=1)  # [heads, L]: summed over queries
            expected = expected.reshape(config.num_key_value_heads, groups, -1).sum(dim=1)
            got = cache.layers[layer_idx].slot["h2o"][row]
            torch.testing.assert_close(got[:, : len(fed)], expected, atol=1e-4, rtol=1e-4)
            assert torch.all(got[:, len(fed) :] == 0)


def test_h2o_keeps_heavy_hitters_per_head():
    budget, window, ratio = 20, 2, 0.25  # keeps 4 older per head
    drv = Driver(policy("h2o", budget, window, ratio), layers=1, q_heads=4, kv_heads=2, head_dim=32)
    keys = torch.eye(32)[:20] * 1.0
    q = torch.zeros(1, 4, 20, 32)
    q[0, :2] = 40 * (keys[1] + keys[3] + keys[5] + keys[8])  # KV head 0's queries look at 1, 3, 5, 8
    q[0, 2:] = 40 * (keys[2] + keys[4] + keys[6] + keys[9])  # KV head 1's at 2, 4, 6, 9
    drv.prefill(0, 20, q=q, k=keys[None, None].expand(1, 2, 20, 32).clone())
    keep = drv.compress()
    assert keep[0, 0, :4].tolist() == [1, 3, 5, 8]
    assert keep[0, 1, :4].tolist() == [2, 4, 6, 9]


def test_h2o_scores_do_not_leak_into_freed_slots():
    """After a compaction, a new token's accumulated attention starts from zero (not the score of whatever
    token used to occupy its slot)."""
    budget, window, ratio = 20, 2, 0.5
    drv = Driver(policy("h2o", budget, window, ratio), layers=1, q_heads=4, kv_heads=2)
    drv.prefill(0, 19)
    for layer in drv.cache.layers:
        layer.slot["h2o"][0, :, :19] += 100.0  # heavy scores everywhere
    drv.step()
    drv.compress()
    n = drv.cache.lengths[0]
    for _ in range(3):
        drv.step()
    groups = drv.q_heads // drv.kv_heads
    for layer in drv.cache.layers:
        fresh = layer.slot["h2o"][0, :, n : n + 3]  # received at most one unit per query head and step
        assert torch.all(fresh <= 3 * groups + 1e-5), fresh


# --- SnapKV --------------------------------------------------------------------------------------------
def test_snapkv_keeps_what_the_observation_window_attends_to_per_head():
    budget, window, ratio = 40, 4, 0.2  # 36 older slots, keeps 7
    drv = Driver(policy("snapkv", budget, window, ratio), layers=1, q_heads=4, kv_heads=2, head_dim=48)
    keys = torch.eye(48)[:budget]
    q = torch.zeros(1, 4, budget, 48)
    q[0, :2] = 40 * keys[7]  # the group of KV head 0 attends to slot 7 ...
    q[0, 2:] = 40 * keys[25]  # ... and that of KV head 1 to slot 25
    k = keys[None, None].expand(1, 2, budget, 48).clone()
    drv.prefill(0, 30, q=q[:, :, :30], k=k[:, :, :30])
    for t in range(30, budget):  # the rest through the decode path
        drv.step(q=q[:, :, t : t + 1], k=k[:, :, t : t + 1])
    keep = drv.compress()
    # 1-D pooling spreads the vote of slot 7 to its neighbours within the kernel (7): slots 4..10
    assert keep[0, 0, :7].tolist() == list(range(4, 11))
    assert keep[0, 1, :7].tolist() == list(range(22, 29))


def test_snapkv_ignores_queries_older_than_its_observation_window():
    budget, window, ratio = 60, 4, 0.125  # 56 older slots, keeps 7
    drv = Driver(policy("snapkv", budget, window, ratio), layers=1, q_heads=2, kv_heads=1, head_dim=64)
    keys = torch.eye(64)[:budget]
    q = torch.zeros(1, 2, budget, 64)
    q[0, :, :28] = 60 * keys[3]  # old queries (outside the last 32) look at slot 3
    q[0, :, 28:] = 60 * keys[20]  # the last 32 look at slot 20
    drv.prefill(0, budget - 1, q=q[:, :, :-1], k=keys[None, None, :-1].clone())
    drv.step(q=q[:, :, -1:], k=keys[None, None, -1:].clone())
    keep = drv.compress()
    assert keep[0, 0, :7].tolist() == list(range(17, 24))


# --- scope: per-head (the original methods) or shared (the DynTS paper's baselines) ---------------------
@pytest.mark.parametrize("name", ["h2o", "snapkv", "rkv"])
def test_shared_scope_is_one_set_from_the_mean_of_per_head_scores(name):
    """Fed the same tokens, the shared scope scores each slot with the mean over layers and KV heads of the
    per-head scores, and keeps one index set: every layer and head then holds the same tokens."""
    budget, window, ratio = 30, 4, 0.5
    drivers = {}
    for scope in ("per-head", "shared"):
        drv = Driver(policy(f"{name}:scope={scope}", budget, window, ratio), layers=3, q_heads=4, kv_heads=2, seed=5)
        drv.prefill(0, 10)
        while drv.cache.lengths[0] < budget:
            drv.step()
        drivers[scope] = drv
    per_head, shared = drivers["per-head"], drivers["shared"]
    assert per_head.policy.per_head and not shared.policy.per_head
    older = budget - window
    by_head = per_head.policy.score_older(per_head.cache, 0, older)
    assert by_head.shape == (3, 2, older)
    torch.testing.assert_close(shared.policy.score_older(shared.cache, 0, older), by_head.mean(dim=(0, 1)))
    assert per_head.policy.select(per_head.cache, 0).shape == (3, 2, window + 13)
    keys_before = [layer.keys[0, :, :budget].clone() for layer in shared.cache.layers]
    keep = shared.compress()
    assert keep.shape == (window + 13,)
    for layer, before in zip(shared.cache.layers, keys_before):
        torch.testing.assert_close(layer.keys[0, :, : len(keep)], before[:, keep])


def test_h2o_shared_keeps_the_best_mean_not_each_heads_best():
    """Hand-set accumulated attention, 2 layers x 2 KV heads, 6 older slots, keep 2. Per head each picks its own
    top two; shared picks the two best means over the four heads."""
    budget, window, ratio = 10, 4, 1 / 3  # 6 older slots, keeps 2
    scores = torch.tensor(
        [
            [[9.0, 8.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 9.0, 8.0, 1.0, 0.0]],
            [[0.0, 0.0, 0.0, 0.0, 3.0, 11.0], [1.0, 0.0, 0.0, 0.0, 3.0, 0.0]],
        ]
    )  # means over the 4 heads: [2.5, 2.0, 2.25, 2.0, 2.0, 2.75]
    kept = {}
    for scope in ("per-head", "shared"):
        drv = Driver(policy(f"h2o:scope={scope}", budget, window, ratio), layers=2, q_heads=2, kv_heads=2)
        drv.prefill(0, budget - 1)
        drv.step()
        for layer, per_layer in zip(drv.cache.layers, scores):
            layer.slot["h2o"][0, :, :6] = per_layer
        kept[scope] = drv.compress()
    assert kept["per-head"][..., :2].tolist() == [[[0, 1], [2, 3]], [[4, 5], [0, 4]]]
    assert kept["shared"].tolist() == [0, 5, 6, 7, 8, 9]  # the means 2.5 and 2.75, then the window


# --- R-KV ----------------------------------------------------------------------------------------------
def rkv_driver(budget, window, ratio, keys, q=None):
    drv = Driver(policy("rkv", budget, window, ratio), layers=1, q_heads=1, kv_heads=1, head_dim=keys.shape[-1])
    n = keys.shape[0]
    q = torch.zeros(1, 1, n, keys.shape[-1]) if q is None else q
    drv.prefill(0, n, q=q, k=keys[None, None].clone())
    return drv


def test_redundancy_by_hand():
    """R-KV's redundancy on four unit keys in 2-D, threshold 0.7. Every similarity is kept (also those under the
    threshold); the threshold only finds, per row, the newest near-duplicate, whose entry is zeroed.

    keys: k0 = (1, 0), k1 = (0.8, 0.6), k2 = (0, 1), k3 = (1, 0)
    cosines: s01 = 0.8, s02 = 0, s03 = 1, s12 = 0.6, s13 = 0.8, s23 = 0; diagonal zeroed
    near-duplicates (> 0.7): row 0 {1, 3} -> newest 3; row 1 {0, 3} -> 3; row 2 {} -> none; row 3 {0, 1} -> 1
    rows after zeroing:  row 0 [0, .8, 0, 0]   (s03 zeroed)
                         row 1 [.8, 0, .6, 0]  (s13 zeroed; s12 = 0.6 < 0.7 is kept)
                         row 2 [0, .6, 0, 0]   (nothing zeroed)
                         row 3 [1, 0, 0, 0]    (s31 zeroed)
    column means over the 4 rows: [1.8, 1.4, 0.6, 0] / 4 = [0.45, 0.35, 0.15, 0]
    softmax over the whole cache: exp([0.45, 0.35, 0.15, 0]) / (e^.45 + e^.35 + e^.15 + 1)
    """
    keys = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    means = [0.45, 0.35, 0.15, 0.0]
    total = sum(math.exp(m) for m in means)
    expected = torch.tensor([math.exp(m) / total for m in means])
    got = redundancy(keys[None], threshold=0.7)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_redundancy_exempts_the_newest_copy():
    """Three copies of one key: the oldest is the most redundant, the newest as little as a unique key."""
    keys = torch.eye(8)
    keys[5] = keys[2]
    keys[6] = keys[2]
    red = redundancy(keys[None], threshold=0.5)[0]
    # rows 2 and 5 exempt their entry for 6, row 6 its entry for 5: column 2 keeps 2 ones, 5 keeps 1, 6 none
    assert red[2] > red[5] > red[0]
    assert red[6] == pytest.approx(float(red[0]))
    assert red[0] == pytest.approx(float(red[1]))


def test_rkv_importance_by_hand():
    """R-KV's importance: attention logits max-pooled over the KV group's query heads before the softmax, the
    softmax over the older keys (a query sees keys up to its own slot only), averaged over the observation queries.

    One KV head with two query heads (a, b), head_dim 4 (scaling 1/2), cache of 4 tokens, W = 1: older keys 0..2.
    Keys k_j = 2 e_j are orthogonal, so the logit of query q to key j is q_j, and redundancy is uniform: every
    column mean is 0 and the softmax over the 4 keys gives 1/4 each. observation 3: the queries of slots 1, 2, 3.
      slot 1: a = (3, 0, 9), b = 0     -> max (3, 0, 9), key 2 is after slot 1: softmax of (3, 0) over keys 0, 1
              = (e^3, 1, 0) / (e^3 + 1)              = (0.952574, 0.047426, 0)
      slot 2: a = (1, 2, 0), b = (-1, -2, 0) -> max (1, 2, 0)
              = (e, e^2, 1) / (e + e^2 + 1)          = (0.244728, 0.665241, 0.090031)
      slot 3: a = (-1, -2, 0), b = (2, 4, 0) -> max (2, 4, 0)
              = (e^2, e^4, 1) / (e^2 + e^4 + 1)      = (0.117310, 0.866813, 0.015876)
    importance = mean over the 3 queries = (0.438204, 0.526493, 0.035302); kernel 1 (no pooling);
    score = 0.1 * importance - 0.9 * 1/4.
    """
    keys = 2 * torch.eye(4)
    q = torch.zeros(1, 2, 4, 4)  # [batch, q_heads, slots, head_dim]
    q[0, 0, 1, :3] = torch.tensor([3.0, 0.0, 9.0])
    q[0, 0, 2, :3] = torch.tensor([1.0, 2.0, 0.0])
    q[0, 1, 2, :3] = torch.tensor([-1.0, -2.0, 0.0])
    q[0, 0, 3, :3] = torch.tensor([-1.0, -2.0, 0.0])
    q[0, 1, 3, :3] = torch.tensor([2.0, 4.0, 0.0])

    def softmax(*logits):
        total = sum(math.exp(x) for x in logits)
        return [math.exp(x) / total for x in logits]

    per_query = [softmax(3, 0) + [0.0], softmax(1, 2, 0), softmax(2, 4, 0)]
    importance = [sum(p[j] for p in per_query) / 3 for j in range(3)]
    assert importance == pytest.approx([0.438204, 0.526493, 0.035302], abs=1e-6)
    expected = torch.tensor([0.1 * x - 0.9 * 0.25 for x in importance])
    for scope in ("per-head", "shared"):
        pol = make_policy("rkv", BudgetConfig(4, 1, 0.5), {"observation": 3, "kernel": 1, "scope": scope})
        drv = Driver(pol, layers=1, q_heads=2, kv_heads=1, head_dim=4)
        drv.prefill(0, 4, q=q, k=keys[None, None].clone())
        got = pol.score_older(drv.cache, 0, 3)
        assert got.shape == ((1, 1, 3) if scope == "per-head" else (3,))
        torch.testing.assert_close(got.reshape(3), expected, atol=1e-6, rtol=1e-5)


def test_rkv_drops_the_oldest_of_three_copies_first():
    budget, window = 24, 8  # 16 older slots
    keys = torch.eye(32)[:budget]
    keys[5] = keys[2]
    keys[9] = keys[2]
    drv = rkv_driver(budget, window, 15 / 16, keys)  # keeps 15 of 16: exactly one goes
    kept = drv.compress()[0, 0, :15].tolist()
    assert kept == [i for i in range(16) if i != 2]


def test_rkv_drops_all_but_the_newest_of_three_copies():
    budget, window = 24, 8
    keys = torch.eye(32)[:budget]
    keys[5] = keys[2]
    keys[9] = keys[2]
    drv = rkv_driver(budget, window, 14 / 16, keys)
    kept = drv.compress()[0, 0, :14].tolist()
    assert kept == [i for i in range(16) if i not in (2, 5)]


def test_rkv_prefers_attended_keys():
    budget, window = 24, 8
    keys = torch.eye(32)[:budget]
    q = torch.zeros(1, 1, budget, 32)
    q[0, 0, -8:] = 40 * keys[10]  # the last 8 queries attend to slot 10
    q[0, 0, :-8] = 40 * keys[1]  # older queries (outside R-KV's 8) would pick slot 1
    drv = rkv_driver(budget, window, 7 / 16, keys, q=q)
    kept = drv.compress()[0, 0, :7].tolist()
    assert kept == list(range(7, 14))  # max-pooling (kernel 7) spreads slot 10's importance


# --- DynTS ---------------------------------------------------------------------------------------------
def dynts_driver(name="dynts", budget=20, window=4, ratio=0.5, prompt=2):
    drv = Driver(policy(name, budget, window, ratio), layers=1)
    drv.prefill(0, prompt)
    while drv.cache.lengths[0] < budget:
        drv.step()
    return drv


def set_scores(drv, scores):
    drv.cache.slot["importance"][0, : len(scores)] = torch.tensor(scores, dtype=torch.float32)


INF = float("inf")


def test_dynts_scores_on_entry_and_protection():
    pol = policy("dynts", 20, 4, 0.5)
    drv = Driver(pol, layers=1)
    hidden = torch.randn(1, 3, HIDDEN)
    drv.prefill(0, 3, hidden=hidden)
    assert torch.all(torch.isposinf(drv.cache.slot["importance"][0, :3]))
    h = torch.randn(1, 1, HIDDEN)
    drv.step(hidden=h)
    with torch.no_grad():
        expected = pol.head(h)[0, 0]
    assert drv.cache.slot["importance"][0, 3] == pytest.approx(float(expected))
    drv.step(in_answer=torch.tensor([[True]]))  # after </think>: protected
    assert torch.isposinf(drv.cache.slot["importance"][0, 4])

    ablation = Driver(policy("dynts-noquestion", 20, 4, 0.5), layers=1)  # the paper's: the prompt scores 0
    ablation.prefill(0, 3, hidden=hidden)
    assert ablation.cache.slot["importance"][0, :3].tolist() == [0.0, 0.0, 0.0]
    ablation.step(hidden=h)
    assert ablation.cache.slot["importance"][0, 3] == pytest.approx(float(expected))


def test_dynts_top_k_with_protected():
    drv = dynts_driver()  # 16 older slots, keeps 8
    scores = [INF, INF, 0.5, 0.1, 3.0, 0.2, 2.0, INF, 0.3, 1.0, 0.05, 4.0, 0.4, 0.6, 5.0, 0.01]
    set_scores(drv, scores)
    keep = drv.compress()
    assert keep.tolist() == [0, 1, 4, 6, 7, 9, 11, 14] + list(range(16, 20))
    assert drv.policy.protected_overflow == 0


def test_dynts_keeps_newest_protected_on_overflow():
    drv = dynts_driver()
    scores = [INF] * 3 + [9.0] * 3 + [INF] * 7 + [9.0] * 3  # 10 protected > 8 kept
    set_scores(drv, scores)
    keep = drv.compress()
    assert keep.tolist() == [2, 6, 7, 8, 9, 10, 11, 12] + list(range(16, 20))
    assert drv.policy.protected_overflow == 1


# The ablations on hand-built scores: slots 0, 1 are the prompt (+inf), slot 7 an answer token (+inf).
ABLATION_SCORES = [INF, INF, 0.5, 0.1, 3.0, 0.2, 2.0, INF, 0.3, 1.0, 0.05, 4.0, 0.4, 0.6, 5.0, 0.01]


def kept_older(spec, scores=ABLATION_SCORES, seed=0):
    """The 8 older slots (of 16) a compression keeps when the cache holds `scores`."""
    drv = Driver(policy(spec, 20, 4, 0.5, seed=seed), layers=1)
    drv.prefill(0, 2)
    while drv.cache.lengths[0] < 20:
        drv.step()
    set_scores(drv, scores)
    return drv.compress()[:8].tolist()


def test_dynts_bottom_ignores_protection():
    """The paper's bottom ablation keeps the 8 lowest scores; +inf ranks last, so prompt and answer go first.
    Lowest 8: 0.01 (15), 0.05 (10), 0.1 (3), 0.2 (5), 0.3 (8), 0.4 (12), 0.5 (2), 0.6 (13)."""
    assert kept_older("dynts-bottom") == [2, 3, 5, 8, 10, 12, 13, 15]
    # keep_protected (the earlier variant): the 3 protected slots, then the 5 lowest
    assert kept_older("dynts-bottom:keep_protected=true") == [0, 1, 3, 5, 7, 8, 10, 15]


def test_dynts_random_ignores_protection():
    """The paper's random ablation draws 8 of the 16 older slots alike: protected slots are evicted in some draws
    (each draw keeps all three with probability C(13,5)/C(16,8) = 0.1). keep_protected keeps them always."""
    top = kept_older("dynts")
    assert top == [0, 1, 4, 6, 7, 9, 11, 14]
    draws = [kept_older("dynts-random", seed=seed) for seed in range(8)]
    assert any(not {0, 1, 7} <= set(d) for d in draws)
    assert len({tuple(d) for d in draws}) >= 2 and all(len(set(d)) == 8 for d in draws)
    protected = [kept_older("dynts-random:keep_protected=true", seed=seed) for seed in range(8)]
    assert all({0, 1, 7} <= set(d) for d in protected)
    assert len({tuple(d) for d in protected}) >= 2 and {tuple(d) for d in protected} != {tuple(top)}


def test_dynts_noquestion_evicts_the_prompt_first():
    """The paper's no-question ablation scores the prompt 0, below every score of the head (a Softplus): with 6
    prompt tokens among 16 older slots and 8 kept, the kept ones are thinking tokens only, the head's top 8."""
    drv = dynts_driver("dynts-noquestion", prompt=6)
    scores = drv.cache.slot["importance"][0, :16].clone()
    assert scores[:6].tolist() == [0.0] * 6 and torch.all(scores[6:] > 0)
    best = sorted(scores[6:].topk(8).indices.add(6).tolist())
    assert drv.compress()[:8].tolist() == best
    assert not drv.policy.protects_prompt


# --- cache bookkeeping ---------------------------------------------------------------------------------
def test_select_rows_keeps_per_row_state():
    drv = Driver(policy("h2o", 30, 4, 0.5), rows=3)
    for row, n in enumerate((3, 5, 7)):
        drv.prefill(row, n)
    drv.step()
    before = [layer.slot["h2o"].clone() for layer in drv.cache.layers]
    keys = [layer.keys.clone() for layer in drv.cache.layers]
    drv.cache.select_rows([0, 2])
    assert drv.cache.lengths == [4, 8] and drv.cache.next_position == [4, 8]
    for layer, old, k in zip(drv.cache.layers, before, keys):
        torch.testing.assert_close(layer.slot["h2o"], old[[0, 2]])
        torch.testing.assert_close(layer.keys, k[[0, 2]])
    drv.step()  # still decodes with two rows
    assert drv.cache.lengths == [5, 9]
