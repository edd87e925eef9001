"""The engine core (engine/core.py): requests added at any time decode as they would alone, on both decode paths;
abort frees a row at the next step for a waiting request; per-request sampling params and KV budgets; add_request
refuses what cannot be decoded and leaves the core as it was; the figures a server reports."""

from __future__ import annotations

import dataclasses

import pytest

from dynts.config import BudgetConfig, SamplingConfig, SamplingParams
from dynts.engine import EngineCore, Request, RequestOutput
from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.fast.fast_engine import FastConfig, FastEngine

PROMPTS = [
    [5, 17, 3, 99, 42, 8, 61],
    [7, 8, 9],
    [10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [40, 41],
    [90, 3, 77, 15, 6],
    [101, 102, 103, 104, 105, 106, 107, 108],
]
B, W, R = 24, 4, 0.5
MAX_NEW = 30
GREEDY = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW)
FRAME = BudgetConfig(B, W, R)
PATHS = ["eager", "fast"]


@pytest.fixture(scope="module")
def lm(make_tiny):
    """A tiny model with an EOS its greedy sequences reach at different steps (rows free at different times)."""
    lm = make_tiny("qwen2")
    reference = Engine(lm, "window", BudgetConfig(B, W, R), GREEDY, 6).generate(PROMPTS)
    counts: dict[int, int] = {}
    for result in reference.results:
        for token in set(result.token_ids[3:]):
            counts[token] = counts.get(token, 0) + 1
    eos = max(counts, key=counts.get)
    return dataclasses.replace(lm, eos_token_ids=(eos,))


def build(lm, path, batch_size=3, budget=FRAME, sampling=GREEDY, policy="window", **kwargs):
    if path == "fast":
        fast = FastConfig(sync_check=True, check_every=3)
        return FastEngine(lm, policy, budget, sampling, batch_size, fast=fast, **kwargs)
    return Engine(lm, policy, budget, sampling, batch_size, **kwargs)


def alone(lm, prompt, budget=FRAME, sampling=GREEDY, seed=None, policy="window"):
    engine = Engine(lm, policy, budget, sampling, 1)
    return engine.generate([prompt], seeds=None if seed is None else [seed]).results[0]


def figures(result):
    s = result.stats
    return result.token_ids, s.compressions, s.peak_kv_tokens, s.evicted_tokens, s.finish_reason


def drive(core: EngineCore, arrivals: dict[int, list[Request]], aborts: dict[int, list] | None = None, limit=2000):
    """Step the core to the end, adding requests / aborting ids (callables of the ids so far) at given steps.
    Returns {key: (streamed tokens, final output)}; every request's streamed tokens must equal its result's."""
    streamed: dict = {}
    final: dict = {}
    ids: dict = {}
    for step in range(limit):
        for request in arrivals.get(step, []):
            ids[request.key] = core.add_request(request)
        for pick in (aborts or {}).get(step, []):
            assert core.abort(ids[pick]) is True
        if step > max([*arrivals, *(aborts or {})]) and not core.has_work():
            break
        for out in core.step():
            assert isinstance(out, RequestOutput) and out.key not in final
            streamed.setdefault(out.key, []).extend(out.new_token_ids)
            if out.finished:
                final[out.key] = out
    else:
        raise AssertionError("the core did not finish")
    for key, out in final.items():
        assert streamed[key] == out.result.token_ids
    return final


@pytest.mark.parametrize("path", PATHS)
def test_requests_added_while_others_decode_get_their_tokens_alone(lm, path):
    engine = build(lm, path)
    core = EngineCore(engine)
    requests = [Request.of(p, seed=i, key=i) for i, p in enumerate(PROMPTS)]
    # Two at once, one a few steps later (eager: the stepper grows a row), the rest while all rows are busy and
    # after the batch has drained to nothing.
    arrivals = {0: requests[:2], 4: requests[2:3], 9: requests[3:5]}
    out = drive(core, arrivals)
    late = drive(core, {0: requests[5:]})  # a stepper opened again after the core ran dry
    out.update(late)
    expected = [figures(alone(lm, p, seed=i)) for i, p in enumerate(PROMPTS)]
    assert [figures(out[i].result) for i in range(len(PROMPTS))] == expected
    assert len({len(t) for t, *_ in expected}) > 2 and any(c for _, c, *_ in expected)
    assert all(out[i].finish_reason in ("stop", "length") for i in out) and any(
        out[i].finish_reason == "stop" for i in out
    )
    assert not core.has_work() and core.num_running == 0 and core.num_waiting == 0


def test_eager_rows_grow_back_for_late_requests(lm):
    """The eager stepper drops a row once nothing waits for it, and adds rows again when requests arrive."""
    engine = build(lm, "eager", batch_size=3)
    core = EngineCore(engine)
    core.add_request(Request.of(PROMPTS[0], 0, key="a"))
    for _ in range(3):
        core.step()
    assert len(core.stepper.cache.lengths) == 1
    core.add_request(Request.of(PROMPTS[1], 0, key="b"))
    core.add_request(Request.of(PROMPTS[2], 0, key="c"))
    core.step()
    assert len(core.stepper.cache.lengths) == 3 and core.num_running == 3
    while core.has_work():
        core.step()


@pytest.mark.parametrize("path", PATHS)
def test_abort_frees_the_row_for_a_waiting_request(lm, path):
    engine = build(lm, path, batch_size=2, sampling=dataclasses.replace(GREEDY, ignore_eos=True))
    core = EngineCore(engine)
    a, b, c = (Request.of(PROMPTS[i], 0, key=k) for i, k in ((0, "a"), (2, "b"), (4, "c")))
    ids = [core.add_request(r) for r in (a, b, c)]
    assert (core.num_waiting, core.num_running) == (3, 0)
    outputs = []
    for _ in range(7):
        outputs += core.step()
    assert (core.num_running, core.num_waiting) == (2, 1)
    streamed_a = sum((o.new_token_ids for o in outputs if o.key == "a"), [])
    assert core.abort(ids[0]) is True and core.abort(ids[0]) is False  # asked once
    ended = [o for o in core.step() if o.finished]
    assert [(o.key, o.finish_reason) for o in ended] == [("a", "abort")]
    assert ended[0].result.stats.finish_reason == "abort"
    assert streamed_a + ended[0].new_token_ids == ended[0].result.token_ids
    assert 0 < len(ended[0].result.token_ids) < MAX_NEW
    held = {seq.request.key for seq in core.scheduler.held if seq is not None}
    assert held == {"b", "c"} and core.num_waiting == 0  # c took a's row at once
    final = {}
    while core.has_work():
        final.update({o.key: o for o in core.step() if o.finished})
    assert core.abort(ids[0]) is False and core.abort(ids[1]) is False  # finished: nothing to abort
    sampling = dataclasses.replace(GREEDY, ignore_eos=True)
    for key, prompt in (("b", PROMPTS[2]), ("c", PROMPTS[4])):
        assert figures(final[key].result) == figures(alone(lm, prompt, sampling=sampling, seed=0))


def test_abort_of_a_waiting_request_never_admits_it(lm):
    core = EngineCore(build(lm, "eager", batch_size=1))
    first = core.add_request(Request.of(PROMPTS[0], 0, key="first"))
    second = core.add_request(Request.of(PROMPTS[1], 0, key="second"))
    core.step()
    assert core.abort(second, reason="client gone") and not core.abort(12345)
    outs = core.step()
    gone = [o for o in outs if o.key == "second"]
    assert gone and gone[0].finished and gone[0].finish_reason == "client gone" and gone[0].new_token_ids == []
    assert gone[0].result.token_ids == [] and core.num_waiting == 0
    while core.has_work():
        outs = core.step()
        assert all(o.key == "first" for o in outs)
    assert first == 0


def test_per_request_sampling_in_one_batch(lm):
    """Greedy and sampled requests share a batch; a sampled request's tokens come from its seed alone."""
    engine = build(lm, "eager", batch_size=3, sampling=SamplingConfig(max_new_tokens=MAX_NEW))  # sampled default
    core = EngineCore(engine)
    hot = SamplingParams(temperature=1.2, top_p=0.9, top_k=0, seed=7, max_new_tokens=20)
    requests = {
        "greedy": Request.of(PROMPTS[0], key="greedy", sampling=SamplingParams(temperature=0, max_new_tokens=MAX_NEW)),
        "hot": Request.of(PROMPTS[1], key="hot", sampling=hot),
        "hot-other-seed": Request.of(PROMPTS[1], key="hot-other-seed", sampling=dataclasses.replace(hot, seed=8)),
        "default": Request.of(PROMPTS[2], 5, key="default"),
    }
    out = drive(core, {0: list(requests.values())})
    assert out["greedy"].result.token_ids == alone(lm, PROMPTS[0]).token_ids
    hot_config = SamplingConfig(temperature=1.2, top_p=0.9, top_k=0, max_new_tokens=20)
    assert out["hot"].result.token_ids == alone(lm, PROMPTS[1], sampling=hot_config, seed=7).token_ids
    assert out["hot-other-seed"].result.token_ids != out["hot"].result.token_ids
    assert len(out["hot"].result.token_ids) <= 20
    default = alone(lm, PROMPTS[2], sampling=SamplingConfig(max_new_tokens=MAX_NEW), seed=5)
    assert out["default"].result.token_ids == default.token_ids
    again = drive(EngineCore(engine), {0: [requests["hot"]]})  # reproducible
    assert again["hot"].result.token_ids == out["hot"].result.token_ids


def test_stop_tokens_and_ignore_eos_per_request(lm):
    eos = lm.eos_token_ids[0]
    no_eos = dataclasses.replace(GREEDY, ignore_eos=True)
    for prompt in PROMPTS:  # one whose greedy sequence reaches EOS, late enough to hold a stop token before it
        reference = alone(lm, prompt, sampling=no_eos)
        if eos in reference.token_ids[3:] and eos not in reference.token_ids[:3]:
            break
    else:
        pytest.fail("no prompt reaches the EOS late")
    stop = reference.token_ids[2]
    cut = reference.token_ids.index(stop) + 1
    core = EngineCore(build(lm, "eager"))
    out = drive(
        core,
        {
            0: [
                Request.of(prompt, key="stop", sampling=SamplingParams(0, stop_token_ids=[stop], max_new_tokens=30)),
                Request.of(prompt, key="no-eos", sampling=SamplingParams(0, ignore_eos=True, max_new_tokens=30)),
                Request.of(prompt, key="eos", sampling=SamplingParams(0, max_new_tokens=30)),
            ]
        },
    )
    assert out["stop"].result.token_ids == reference.token_ids[:cut] and out["stop"].finish_reason == "stop"
    assert out["stop"].result.stats.finish_reason == "stop"
    assert out["no-eos"].result.token_ids == reference.token_ids and out["no-eos"].finish_reason == "length"
    assert out["eos"].result.token_ids[-1] == eos and out["eos"].finish_reason == "stop"
    assert out["eos"].result.stats.finish_reason == "eos"


def test_fast_path_samples_each_row_with_its_own_params(lm):
    """The static path's captured sampler reads each row's greedy flag, temperature, top-p and top-k from device
    tensors: one batch holds a greedy row, a row with the engine's params and a hotter, narrower one, and each
    decodes as it would alone."""
    sampled = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.8, ignore_eos=True)  # top_k 20: the candidates
    engine = build(lm, "fast", sampling=sampled)
    hot = SamplingParams(temperature=1.3, top_p=0.8, top_k=5, seed=3, max_new_tokens=MAX_NEW, ignore_eos=True)
    requests = [
        Request.of(PROMPTS[0], key="greedy", sampling=SamplingParams(0, max_new_tokens=MAX_NEW, ignore_eos=True)),
        Request.of(PROMPTS[1], 11, key="default"),
        Request.of(PROMPTS[2], key="hot", sampling=hot),
        Request.of(PROMPTS[3], key="short", sampling=SamplingParams(0.8, seed=11, max_new_tokens=9)),
    ]
    out = drive(EngineCore(engine), {0: requests})
    assert (
        out["greedy"].result.token_ids
        == alone(lm, PROMPTS[0], sampling=dataclasses.replace(GREEDY, ignore_eos=True)).token_ids
    )
    assert out["default"].result.token_ids == engine.generate([PROMPTS[1]], seeds=[11]).results[0].token_ids
    narrow = build(
        lm,
        "fast",
        sampling=SamplingConfig(temperature=1.3, top_p=0.8, top_k=5, max_new_tokens=MAX_NEW, ignore_eos=True),
    )
    assert out["hot"].result.token_ids == narrow.generate([PROMPTS[2]], seeds=[3]).results[0].token_ids
    assert out["hot"].result.token_ids != out["default"].result.token_ids
    assert out["short"].result.token_ids == engine.generate([PROMPTS[3]], seeds=[11]).results[0].token_ids[:9]
    core = EngineCore(engine)
    for bad, message in ((dict(top_k=0), "within the engine's 20 candidates"), (dict(top_k=50), "from 1 to 20")):
        with pytest.raises(DynTSError, match=message):
            core.add_request(Request.of(PROMPTS[0], sampling=SamplingParams(0.7, **bad)))
    greedy_core = EngineCore(build(lm, "fast"))
    with pytest.raises(DynTSError, match="argmax only"):
        greedy_core.add_request(Request.of(PROMPTS[0], sampling=SamplingParams(0.7)))
    assert not core.has_work() and not greedy_core.has_work() and core.num_waiting == 0


@pytest.mark.parametrize("path", PATHS)
def test_per_request_budget(lm, path):
    """A request with its own budget b compresses at b in the frame (b, W*b/B rounded, r), peaking at b, next to
    requests at the engine's B; it decodes as an engine built with that frame would."""
    sampling = dataclasses.replace(GREEDY, ignore_eos=True)
    engine = build(lm, path, sampling=sampling)
    core = EngineCore(engine)
    small = 16  # window round(4 * 16 / 24) = 3, keeps 3 + floor(0.5 * 13) = 9
    requests = [Request.of(PROMPTS[i], 0, key=i, budget=small if i % 2 else None) for i in range(4)]
    out = drive(core, {0: requests})
    for i in range(4):
        frame = BudgetConfig(small, 3, R) if i % 2 else BudgetConfig(B, W, R)
        expected = alone(lm, PROMPTS[i], budget=frame, sampling=sampling, seed=0)
        got = out[i].result
        assert figures(got) == figures(expected)
        assert got.stats.peak_kv_tokens <= frame.budget and got.stats.compressions >= 1
        assert got.stats.evicted_tokens == got.stats.compressions * (
            frame.budget - frame.kept_after_compression(frame.budget)
        )
    assert BudgetConfig(B, W, R).scaled(small) == BudgetConfig(small, 3, R)
    assert BudgetConfig(B, W, R).scaled(B) == BudgetConfig(B, W, R)


@pytest.mark.parametrize("path", PATHS)
def test_add_request_refuses_and_leaves_the_core_unchanged(lm, path):
    engine = build(lm, path)
    core = EngineCore(engine)
    kept = core.add_request(Request.of(PROMPTS[0], 0, key="ok"))
    core.step()
    before = (core.num_waiting, core.num_running, core.has_work())
    bad = [
        (Request.of(list(range(1, 22)), 0), "does not fit under --budget"),  # 21 + window 4 >= 24
        (Request.of(PROMPTS[1], 0, budget=B + 1), "may not exceed the engine's budget"),
        (Request.of(PROMPTS[1], 0, budget=0), "positive number"),
        (Request.of(PROMPTS[1], 0, budget=4), "does not fit under --budget 4"),  # its own budget: 3 + window 1
        (Request.of(PROMPTS[1], 0, budget=1), "unusable"),  # window 1 = the budget
        (Request.of([1, 2, 500], 0), "outside the vocabulary"),
    ]
    for request, message in bad:
        with pytest.raises(DynTSError, match=message):
            core.add_request(request)
        assert (core.num_waiting, core.num_running, core.has_work()) == before
    for params in (
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_new_tokens=0),
        dict(seed=1.5),
        dict(stop_token_ids=[-1]),
        dict(stop_token_ids="ab"),
        dict(temperature=float("nan")),
    ):
        with pytest.raises(DynTSError):
            SamplingParams(**params)
    with pytest.raises(DynTSError, match="give it once"):
        Request.of(PROMPTS[0], 3, sampling=SamplingParams(seed=4))
    while core.has_work():
        core.step()
    assert kept == 0


def test_budget_the_policy_cannot_take(lm):
    """Streaming's sinks must fit what a compression at the request's own budget keeps; the full policy takes no
    budget; its cache is max_model_len slots a row."""
    streaming = EngineCore(Engine(lm, "streaming", BudgetConfig(B, W, R), GREEDY, 2, policy_options={"sinks": 6}))
    streaming.add_request(Request.of(PROMPTS[1], 0, budget=20))  # keeps floor(0.5 * (20 - 3)) = 8 >= 6 sinks
    with pytest.raises(DynTSError, match="sink tokens do not fit"):
        streaming.add_request(Request.of(PROMPTS[1], 0, budget=12))  # keeps floor(0.5 * (12 - 2)) = 5 < 6 sinks
    assert streaming.num_waiting == 1
    full = EngineCore(Engine(lm, "full", None, GREEDY, 2, max_model_len=40))
    with pytest.raises(DynTSError, match="never compresses"):
        full.add_request(Request.of(PROMPTS[0], 0, budget=16))
    full.add_request(Request.of(PROMPTS[2], 0))  # 10 + 30 tokens: fits 40
    with pytest.raises(DynTSError, match="max_model_len"):
        full.add_request(Request.of(PROMPTS[2], sampling=SamplingParams(0, max_new_tokens=31)))
    assert full.num_waiting == 1 and full.kv_capacity_tokens == 2 * 40
    out = drive(full, {0: []})
    assert len(out) == 1 and full.stepper is None


def test_figures(lm):
    core = EngineCore(build(lm, "eager", batch_size=2, sampling=dataclasses.replace(GREEDY, ignore_eos=True)))
    assert (core.has_work(), core.num_running, core.num_waiting, core.kv_tokens_in_use) == (False, 0, 0, 0)
    assert core.kv_capacity_tokens == 2 * B and core.batch_size == 2
    for i in range(3):
        core.add_request(Request.of(PROMPTS[i], 0, key=i))
    assert core.has_work() and core.num_waiting == 3 and core.num_running == 0
    core.step()
    assert (core.num_running, core.num_waiting) == (2, 1)
    assert core.kv_tokens_in_use == len(PROMPTS[0]) + len(PROMPTS[1])
    peak = 0
    while core.has_work():
        core.step()
        assert core.kv_tokens_in_use <= core.kv_capacity_tokens
        peak = max(peak, core.kv_tokens_in_use)
    assert B < peak <= 2 * B and core.kv_tokens_in_use == 0 and core.num_running == 0


@pytest.mark.slow
def test_embedded_model_request_added_mid_decode(smollm):
    """On the real model: a request added while another decodes gets the tokens it gets alone."""
    lm = smollm
    sampling = SamplingConfig(greedy=True, max_new_tokens=12)
    prompts = [lm.tokenizer.encode(t) for t in ("The following is a list of fruits:", "One, two, three,")]
    engine = Engine(lm, "h2o", BudgetConfig(20, 4, 0.5), sampling, 2)
    core = EngineCore(engine)
    out = drive(core, {0: [Request.of(prompts[0], 0, key=0)], 5: [Request.of(prompts[1], 0, key=1)]})
    for i, p in enumerate(prompts):
        reference = Engine(lm, "h2o", BudgetConfig(20, 4, 0.5), sampling, 1).generate([p]).results[0]
        assert figures(out[i].result) == figures(reference)


def test_fast_path_admission_between_host_reads(lm):
    """A request that arrives between two host reads is prefilled into an idle row mid-chunk: the chunk's earlier
    columns are not its tokens."""
    sampling = dataclasses.replace(GREEDY, ignore_eos=True)
    engine = build(lm, "fast", batch_size=3, sampling=sampling)  # 2 of 3 rows live: no release, the row idles
    core = EngineCore(engine)
    core.add_request(Request.of(PROMPTS[2], 0, key="long"))
    core.add_request(Request.of(PROMPTS[0], 0, key="long2"))
    core.add_request(Request.of(PROMPTS[3], 0, key="short", sampling=SamplingParams(0, max_new_tokens=4, seed=0)))
    final, late_at, rows = {}, None, None
    while core.has_work():
        stepper = core.stepper
        added = late_at is None and "short" in final and stepper is not None and len(stepper.logs) % stepper.chunk
        if added:
            late_at = len(stepper.logs)
            core.add_request(Request.of(PROMPTS[4], 0, key="late"))
        final.update({o.key: o for o in core.step() if o.finished})
        if added:
            rows = [seq.request.key if seq else None for seq in core.scheduler.held]
    assert late_at and len(rows) == 3 and "late" in rows  # mid-chunk, into the idle row
    cases = [("long", PROMPTS[2], MAX_NEW), ("long2", PROMPTS[0], MAX_NEW), ("short", PROMPTS[3], 4)]
    for key, prompt, n in cases + [("late", PROMPTS[4], MAX_NEW)]:
        expected = alone(lm, prompt, sampling=dataclasses.replace(sampling, max_new_tokens=n), seed=0)
        assert figures(final[key].result) == figures(expected)


def test_teacher_forcing_through_the_core(lm):
    """Forced tokens are emitted as given on the eager path; the static path refuses them (they need the eager
    stepper) instead of sampling."""
    forced = [3, 1, 4, 1, 5]
    out = drive(EngineCore(build(lm, "eager")), {0: [Request.of(PROMPTS[0], 0, key="f", forced=forced)]})
    assert out["f"].result.token_ids == forced and out["f"].finish_reason == "length"
    core = EngineCore(build(lm, "fast"))
    with pytest.raises(DynTSError, match="teacher forcing"):
        core.add_request(Request.of(PROMPTS[0], 0, forced=forced))
    assert not core.has_work()


@pytest.mark.parametrize("policy", ["h2o", "rkv", "dynts", "sepllm"])
def test_grown_rows_carry_every_policy_buffer(lm, policy):
    """Rows the eager stepper adds back hold every per-slot and per-row buffer a policy keeps (attention sums,
    recent queries, importance scores) at their fill values: a late request decodes as it would alone."""
    from dynts.models.importance_head import random_head

    head = random_head(lm.hidden_size, seed=3) if policy == "dynts" else None
    frame = BudgetConfig(B, W, R)
    sampling = dataclasses.replace(GREEDY, ignore_eos=True)
    engine = Engine(lm, policy, frame, sampling, 3, head=head)
    rows: list[int] = []
    engine.on_step = rows.append
    requests = [Request.of(PROMPTS[i], 0, key=i) for i in (0, 2, 5)]
    out = drive(EngineCore(engine), {0: requests[:1], 6: requests[1:]})  # rows 1 and 2 are added at step 6
    assert rows[:4] == [1] * 4 and 3 in rows  # one row decoding alone, then three
    for i in (0, 2, 5):
        expected = Engine(lm, policy, frame, sampling, 1, head=head).generate([PROMPTS[i]]).results[0]
        assert figures(out[i].result) == figures(expected)
    assert any(out[i].result.stats.compressions for i in out)


def test_requests_added_from_another_thread(lm):
    """add_request from another thread while this one steps (a server's shape): every request completes with its
    tokens alone."""
    import threading
    import time

    engine = build(lm, "eager")
    core = EngineCore(engine)
    done: dict = {}

    def client():
        for i, p in enumerate(PROMPTS):
            core.add_request(Request.of(p, 0, key=i))
            time.sleep(0.01 * i)

    thread = threading.Thread(target=client)
    thread.start()
    while thread.is_alive() or core.has_work():
        done.update({o.key: o for o in core.step() if o.finished})
    thread.join()
    assert sorted(done) == list(range(len(PROMPTS)))
    for i, p in enumerate(PROMPTS):
        assert figures(done[i].result) == figures(alone(lm, p, seed=0))


def test_one_spec_builds_every_engine(lm):
    from dynts.api import build_engine, make_engine
    from dynts.engine.spec import EngineSpec
    from dynts.runtime.executor import EngineSpec as Reexported

    assert Reexported is EngineSpec
    spec = EngineSpec("window", FRAME, GREEDY, 2, policy_options={"protect_prompt": True}, max_model_len=64)
    assert spec.policy_options == (("protect_prompt", True),) and hash(spec)
    eager, fast = build_engine(lm, dataclasses.replace(spec, fast=False)), build_engine(lm, spec)
    assert type(eager) is Engine and type(fast) is FastEngine  # the fast path is the default on a CPU too
    assert eager.policy.protects_prompt and fast.policy.protects_prompt and eager.max_model_len == 64
    assert EngineSpec.of(eager) == dataclasses.replace(spec, policy_options=(("protect_prompt", True),))
    assert type(make_engine(lm, "window", FRAME, GREEDY, 2, fast=True)) is FastEngine
    for bad, message in ((dict(batch_size=0), "--batch-size"), (dict(batching="dynamic"), "--batching")):
        with pytest.raises(DynTSError, match=message):
            EngineSpec("window", FRAME, GREEDY, **bad)
    with pytest.raises(DynTSError, match="--max-model-len"):
        build_engine(lm, dataclasses.replace(spec, max_model_len=1))


def test_fast_core_keeps_full_width_for_late_requests(lm):
    """A core (full width by default) opens the static stepper with every row and keeps the idle ones short and in
    place, so requests arriving later are admitted at once; stream opens as wide as its requests."""
    sampling = dataclasses.replace(GREEDY, ignore_eos=True)
    engine = build(lm, "fast", batch_size=4, sampling=sampling)
    core = EngineCore(engine)
    long = SamplingParams(0, max_new_tokens=80, ignore_eos=True, seed=0)
    core.add_request(Request.of(PROMPTS[0], key="first", sampling=long))
    final = {}
    for _ in range(int(B * 1.5)):  # idle rows run past B steps: they must not outgrow the cache
        final.update({o.key: o for o in core.step() if o.finished})
    assert len(core.stepper.cache.lengths) == 4 and core.num_running == 1
    assert max(core.stepper.cache.lengths) <= B
    for i in (1, 2):
        core.add_request(Request.of(PROMPTS[i], 0, key=i))
    core.step()
    assert core.num_running == 3 and core.num_waiting == 0
    while core.has_work():
        final.update({o.key: o for o in core.step() if o.finished})
    longer = dataclasses.replace(sampling, max_new_tokens=80)
    assert figures(final["first"].result) == figures(alone(lm, PROMPTS[0], sampling=longer, seed=0))
    for key, prompt in ((1, PROMPTS[1]), (2, PROMPTS[2])):
        assert figures(final[key].result) == figures(alone(lm, prompt, sampling=sampling, seed=0))
    narrow = EngineCore(engine, full_width=False)
    narrow.add_request(Request.of(PROMPTS[0], 0))
    narrow.step()
    assert len(narrow.stepper.cache.lengths) == 1
    narrow.close()
