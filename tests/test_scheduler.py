"""Continuous batching (engine/scheduler.py) on both decode paths: a request decodes the same whether alone, in a
static batch, or refilled into a running batch at any step; results come out as sequences end, each exactly
once; the fast path keeps its shapes, releases rows in buckets, falls back safely (kernel check, graph capture)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.engine.requests import Request
from dynts.errors import DynTSError
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.models.importance_head import random_head
from dynts.policies import POLICIES, budget_for

# Seven prompts of different lengths (a dynts prompt must fit floor(r (B - W)) = 10 tokens).
PROMPTS = [
    [5, 17, 3, 99, 42, 8, 61],
    [7, 8, 9],
    [10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [40, 41],
    [90, 3, 77, 15, 6],
    [101, 102, 103, 104, 105, 106, 107, 108],
    [33, 1, 64, 2],
]
B, W, R = 24, 4, 0.5
MAX_NEW = 40


@pytest.fixture(scope="module")
def lm_with_eos(make_tiny):
    """A tiny model whose EOS is a token the greedy sequences reach at different steps, so rows free at
    different times and are refilled mid-run."""
    lm = make_tiny("qwen2")
    reference = Engine(lm, "full", None, SamplingConfig(greedy=True, max_new_tokens=MAX_NEW), 7).generate(PROMPTS)
    firsts: dict[int, set] = {}
    for result in reference.results:
        seen = set()
        for index, token in enumerate(result.token_ids):
            if token not in seen:
                seen.add(token)
                firsts.setdefault(token, set()).add(index)
    eos = max(firsts, key=lambda t: (len(firsts[t]), -min(firsts[t])))
    return dataclasses.replace(lm, eos_token_ids=(eos,))


def engines(lm, name, batch_size, fast: bool, batching="continuous", **fast_options):
    head = random_head(lm.hidden_size, seed=3) if POLICIES[name][0].uses_head else None
    sampling = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW)
    budget = budget_for(name, B, W, R)
    if fast:
        config = FastConfig(sync_check=True, **fast_options)
        return FastEngine(lm, name, budget, sampling, batch_size, head=head, fast=config, batching=batching)
    return Engine(lm, name, budget, sampling, batch_size, head=head, batching=batching)


def figures(result):
    s = result.stats
    return result.token_ids, s.generated_tokens, s.compressions, s.peak_kv_tokens, s.finish_reason


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_refilled_requests_decode_as_alone(lm_with_eos, name, fast):
    lm = lm_with_eos
    alone = [figures(engines(lm, name, 1, fast=False).generate([p]).results[0]) for p in PROMPTS]
    assert len({len(t) for t, *_ in alone}) > 2, "the EOS must end sequences at different lengths"
    engine = engines(lm, name, 3, fast=fast, check_every=3) if fast else engines(lm, name, 3, fast=False)
    refilled = engine.generate(PROMPTS)
    assert [figures(r) for r in refilled.results] == alone
    static = engines(lm, name, 3, fast=fast, batching="static").generate(PROMPTS)
    assert [figures(r) for r in static.results] == alone
    budget = engine.budget
    if budget.compresses:
        assert all(r.stats.peak_kv_tokens <= B for r in refilled.results)
        assert max(engine.last_cache.lengths) <= B
        assert any(r.stats.compressions for r in refilled.results)
    assert refilled.stats.sequences == len(PROMPTS)
    assert refilled.stats.generated_tokens == sum(len(t) for t, *_ in alone)


def test_results_stream_in_completion_order_each_once(make_tiny):
    """Forced lengths make the end of every request known: rows refill as they free, and results come out in
    the order the sequences end, with their keys."""
    lm = make_tiny("llama")
    lengths = [12, 3, 7, 2, 9, 4, 6]
    requests = [Request.of(PROMPTS[i], seed=i, key=f"r{i}", forced=[1] * n) for i, n in enumerate(lengths)]
    engine = Engine(lm, "window", budget_for("window", B, W, R), SamplingConfig(greedy=True), batch_size=3)
    order = [request.key for request, result in engine.stream(requests)]
    # Simulate: a row admits the next request when its sequence ends; a sequence of n tokens ends n - 1 steps
    # after its admission (its first token comes from the prefill).
    ends, rows, queue = [], [0, 0, 0], list(range(len(lengths)))
    for row in range(3):
        i = queue.pop(0)
        ends.append((lengths[i] - 1, i))
        rows[row] = lengths[i] - 1
    while queue:
        row = min(range(3), key=lambda r: rows[r])
        i = queue.pop(0)
        rows[row] += lengths[i] - 1
        ends.append((rows[row], i))
    expected = [f"r{i}" for _, i in sorted(ends)]
    assert order == expected and sorted(order) == sorted(f"r{i}" for i in range(len(lengths)))


def test_stream_yields_each_result_when_it_ends(lm_with_eos):
    """The first result is handed out while other requests are still decoding (not when the batch ends)."""
    engine = engines(lm_with_eos, "window", 3, fast=False)
    steps = []
    engine.on_step = steps.append
    seen_at = []
    for _ in engine.stream([Request.of(p, 0, key=i) for i, p in enumerate(PROMPTS)]):
        seen_at.append(len(steps))
    assert seen_at[0] < seen_at[-1] and len(seen_at) == len(PROMPTS)


def test_fast_path_rows_are_released_in_buckets(lm_with_eos):
    """With no request waiting, the static path keeps its rows until the live ones fall to half, then moves
    them to the front in place: few distinct row counts, not one per finished sequence."""
    engine = engines(lm_with_eos, "window", 6, fast=True, check_every=7)  # idle rows run 7+ steps between reads
    counts = []
    original = engine.stepper

    def spying_stepper(rows, capacity, on_logits=None):
        stepper = original(rows, capacity, on_logits)
        release = stepper.release

        def spy(live):
            counts.append((len(stepper.counts), len(live)))
            release(live)

        stepper.release = spy
        return stepper

    engine.stepper = spying_stepper
    out = engine.generate(PROMPTS)
    alone = [figures(engines(lm_with_eos, "window", 1, fast=False).generate([p]).results[0]) for p in PROMPTS]
    assert [figures(r) for r in out.results] == alone
    releases = [(before, after) for before, after in counts if after < before]
    assert releases and all(after <= before // 2 for before, after in releases[:-1])


def test_static_batching_releases_in_buckets_and_refills_never_wait(lm_with_eos):
    """Static batching on the fast path releases finished rows by the same bucket rule (a new row count, so a new
    capture, per halving of the rows, not per finished row), and a refill into a running batch does not wait for
    the device: only the first rows' prefills synchronize. Captures are counted by the capture guard (one
    recording per capture a GPU would make), synchronizations on the engine."""
    counts = {}
    for batching in ("static", "continuous"):
        engine = engines(lm_with_eos, "window", 6, fast=True, batching=batching, capture_check=True)
        guards, releases, syncs = [], [], []
        original_stepper, original_sync = engine.stepper, engine.synchronize

        def watched(rows, capacity, on_logits=None, stepper=original_stepper, guards=guards, releases=releases):
            made = stepper(rows, capacity, on_logits)
            guards.append(made.static_step.capture_guard)
            release = made.release

            def spy(live):
                if len(live) < len(made.counts):
                    releases.append((len(made.counts), len(live)))
                release(live)

            made.release = spy
            return made

        engine.stepper = watched
        engine.synchronize = lambda sync=original_sync, syncs=syncs: syncs.append(1) or sync()
        out = engine.generate(PROMPTS)
        alone = [figures(engines(lm_with_eos, "window", 1, fast=False).generate([p]).results[0]) for p in PROMPTS]
        assert [figures(r) for r in out.results] == alone
        counts[batching] = (len(guards), sum(g.recordings for g in guards), releases, len(syncs))
    batches, captures, releases, syncs = counts["static"]  # two batches: 6 requests, then 1
    assert batches == 2 and syncs == 6 + 1, counts
    assert releases and all(after <= before // 2 for before, after in releases[:-1]), counts
    assert len(releases) <= 2 and captures <= 1 + len(releases) + 1, counts  # 6 -> 3 -> 1 at most
    batches, captures, releases, syncs = counts["continuous"]
    assert batches == 1 and syncs == 6, counts  # the seventh request is a refill: no sync


def test_failing_kernel_falls_back_to_sdpa_with_one_warning(lm_with_eos, monkeypatch):
    import dynts.fast.attention as attention

    def broken(query, key, value, kv_lengths, scale, kernel):
        raise RuntimeError("no such device function")

    monkeypatch.setattr(attention, "length_aware_attention", broken)
    engine = engines(lm_with_eos, "window", 3, fast=True)
    engine.fast = dataclasses.replace(engine.fast, kernel="triton")  # as if Triton had been picked on a GPU
    with pytest.warns(UserWarning, match="failed its check against SDPA.*using sdpa") as caught:
        out = engine.generate(PROMPTS)
        engine.generate(PROMPTS[:2])
    assert sum("failed its check" in str(w.message) for w in caught) == 1
    assert engine.last_profile.kernel == "sdpa"
    reference = engines(lm_with_eos, "window", 3, fast=False).generate(PROMPTS)
    assert [figures(r) for r in out.results] == [figures(r) for r in reference.results]


def test_wrong_kernel_output_falls_back(lm_with_eos, monkeypatch):
    import dynts.fast.attention as attention

    monkeypatch.setattr(attention, "length_aware_attention", lambda q, k, v, lengths, scale, kernel: q * 0)
    engine = engines(lm_with_eos, "window", 3, fast=True)
    engine.fast = dataclasses.replace(engine.fast, kernel="flash")
    with pytest.warns(UserWarning, match="differs from SDPA"):
        engine.generate(PROMPTS[:3])


def test_failed_graph_capture_goes_on_eagerly(lm_with_eos, monkeypatch):
    """A capture that raises leaves the step eager, with one warning, and the run finishes with the same
    tokens (the side stream and the capture are what a GPU would run; here they are made to fail)."""
    from dynts.fast.step import StaticStep

    def capture(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticStep, "_capture", capture)
    engine = engines(lm_with_eos, "window", 3, fast=True)
    engine.fast = dataclasses.replace(engine.fast, graphs=True, warmup_steps=2)
    with pytest.warns(UserWarning, match="CUDA graph capture failed.*without graphs"):
        out = engine.generate(PROMPTS)
    assert engine.last_profile.graphs is False
    reference = engines(lm_with_eos, "window", 3, fast=False).generate(PROMPTS)
    assert [figures(r) for r in out.results] == [figures(r) for r in reference.results]


def test_environment_overrides_the_fast_path(monkeypatch):
    monkeypatch.setenv("DYNTS_KERNEL", "sdpa")
    monkeypatch.setenv("DYNTS_GRAPHS", "0")
    config = FastConfig.from_environment()
    assert (config.kernel, config.graphs) == ("sdpa", False)
    assert FastConfig.from_environment(kernel="auto", graphs=None).kernel == "auto"  # a flag wins
    monkeypatch.setenv("DYNTS_GRAPHS", "maybe")
    with pytest.raises(DynTSError, match="DYNTS_GRAPHS"):
        FastConfig.from_environment()


def test_compaction_fills_without_host_data(make_tiny):
    """Compaction writes its fill values from device tensors: under the guard that forbids tensors made from
    Python data (a host-to-device copy on a GPU), a compaction of every policy with slot buffers runs."""
    from dynts.fast.host_sync import HostSyncGuard
    from dynts.fast.static_cache import StaticBudgetedCache
    from dynts.policies import make_policy

    lm = make_tiny("qwen2")
    for name in ("h2o", "dynts", "sepllm"):
        policy = make_policy(name, BudgetConfig(B, W, R), head=random_head(lm.hidden_size))
        policy.bind(lm)
        cache = StaticBudgetedCache(2, 2, B, "cpu")
        cache.add_slot_buffer("position", per_head=False, dtype=torch.long, fill=-1)
        policy.setup(cache)
        cache.preallocate(2, 16, torch.float32)
        cache.lengths = [B, B]
        index = torch.tensor([0, 1])
        keep = torch.arange(W + 10).expand(2, -1).contiguous()
        with HostSyncGuard("compaction"):
            cache.compact_rows([0, 1], index, keep)
        assert cache.lengths == [W + 10, W + 10]


def test_bad_batching_is_refused(make_tiny):
    with pytest.raises(DynTSError, match="--batching"):
        Engine(make_tiny("llama"), "full", None, SamplingConfig(greedy=True), 2, batching="dynamic")


def test_sampled_tokens_depend_only_on_the_request(lm_with_eos):
    """Sampling: a request's tokens come from its own seed on either path, whatever shares its batch."""
    sampling = SamplingConfig(max_new_tokens=24)
    for cls in (Engine, FastEngine):
        kwargs = {"fast": FastConfig(check_every=2)} if cls is FastEngine else {}
        engine = cls(lm_with_eos, "window", budget_for("window", B, W, R), sampling, 3, **kwargs)
        together = engine.generate(PROMPTS, seeds=list(range(7)))
        with warnings.catch_warnings():
            alone = [engine.generate([p], seeds=[i]).results[0].token_ids for i, p in enumerate(PROMPTS)]
        assert [r.token_ids for r in together.results] == alone
