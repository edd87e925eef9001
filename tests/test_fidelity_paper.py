"""The paper-proportions fidelity benchmark: its frame, trace building and skipping rules, aggregation, verdict.
(The benchmark itself, benchmarks/fidelity_paper.py, is not a test.)"""

import json

import pytest

from dynts.config import SamplingConfig
from dynts.engine.engine import Engine
from dynts.engine.replay import replay
from dynts.errors import DynTSError
from dynts.experiments import fidelity_paper as paper
from dynts.experiments.fidelity import Trace


def test_frame_proportions():
    frame = paper.PaperFrame((500, 400))
    assert frame.budgets == (400, 500)
    assert [d["window"] for d in frame.describe()] == [160, 200]  # W / B = 0.4
    assert frame.kept(400) == 160 + int(0.4 * 240) == 256 and frame.kept(500) == 320
    assert frame.max_prompt() == 51  # 20% of the 256 kept at the smallest budget
    n = frame.min_length()
    assert all(frame.compressions(n, b) >= 3 for b in frame.budgets)
    assert frame.compressions(n - 1, 500) == 2  # one token shorter would not do
    for bad in ((400,), (400, 400), (401, 500), (0, 500)):
        with pytest.raises(DynTSError):
            paper.PaperFrame(bad)


def test_compression_count_matches_a_replay(make_tiny):
    """The frame's count of compressions is what the engine does on a trace of that length."""
    loaded = make_tiny(vocab_size=64)
    frame = paper.PaperFrame((20, 30))
    prompt = list(range(1, 5))
    for length in (frame.min_length(), frame.min_length() - 1, 45, 61):
        tokens = [7] * (length - len(prompt))
        for budget in frame.budgets:
            engine = Engine(loaded, "window", frame.config(budget), SamplingConfig(greedy=True, max_new_tokens=1), 1)
            stats = replay(engine, prompt, tokens, lambda *_: None, max_chunk=16)
            assert stats.compressions == frame.compressions(length, budget), (length, budget)


def trace(prompt=40, generated=900, answer=True):
    return Trace(list(range(prompt)), list(range(generated)), generated - 20 if answer else None)


def test_skip_rules_and_selection():
    frame = paper.PaperFrame((400, 500))
    long = frame.min_length()
    assert paper.skip_reason(frame, trace(40, long - 40)) is None
    assert "prompt over 51" in paper.skip_reason(frame, trace(52, long))
    assert "fewer than 3 compressions" in paper.skip_reason(frame, trace(40, long - 41))
    assert paper.skip_reason(frame, trace(40, long, answer=False)) == "no answer span"
    keyed = [([f"k{i}"], trace(40, long)) for i in range(6)] + [(["short"], trace(40, 100))]
    chosen, skipped = paper.select_traces(frame, keyed, limit=5)
    assert [k for k, _ in chosen] == [["k0"], ["k1"], ["k2"], ["k3"], ["k4"]] and sum(skipped.values()) == 1
    few = keyed[:3] + [(["p"], trace(60, long))] * 2
    with pytest.raises(DynTSError, match=r"only 3 traces .*2 prompt over 51"):
        paper.select_traces(frame, few, limit=16)


def test_aggregate_weights_by_positions_and_verdict():
    def rec(policy, budget, kl, n, options=None):
        return {
            "policy": policy,
            "options": options or {},
            "budget": budget,
            "traces": 1,
            "compressions": 3,
            **{f"kl_{s}": kl for s in ("answer", "after", "all")},
            **{f"top1_{s}": 1 - kl for s in ("answer", "after", "all")},
            **{f"positions_{s}": n for s in ("answer", "after", "all")},
        }

    merged = paper.aggregate([[rec("window", 400, 0.1, 10)], [rec("window", 400, 0.4, 30)]])
    assert len(merged) == 1 and merged[0]["kl_answer"] == pytest.approx((0.1 * 10 + 0.4 * 30) / 40)
    assert merged[0]["traces"] == 2 and merged[0]["compressions"] == 6 and merged[0]["positions_answer"] == 40
    assert merged[0]["scope"] is None  # window has no scope option: one index set for all
    assert paper.scope_of("h2o", {}) is not None  # per-head by nature, or its scope option
    records = paper.aggregate([[rec("window", 400, 0.3, 10), rec("sepllm", 400, 0.2, 10), rec("dynts", 400, 0.1, 10)]])
    assert paper.verdict(records) == ["B=400: dynts KL answer 0.1000; lowest of the 2 shared-scope baselines"]
    records = paper.aggregate([[rec("window", 400, 0.05, 10), rec("dynts", 400, 0.1, 10)]])
    assert "not lower than window" in paper.verdict(records)[0]
    table = paper.format_table(records)
    assert table.index("window") < table.index("dynts")  # sorted by KL within a budget


def test_policy_list_is_checked_before_any_work():
    assert paper.policies_from_text("full,window,dynts") == ["full", "window", "dynts"]
    listed = paper.default_policies()
    assert listed[0] == "full" and "dynts" in listed and paper.PROMPT_WINDOW in listed
    for name in paper.SCOPED:  # both scopes: per-head (the default, plain name) and shared
        specs = [spec for spec in listed if spec.split(":")[0] == name]
        assert specs == paper.scoped_specs(name) == [name, f"{name}:scope=shared"]
    with pytest.raises(DynTSError, match="--policies"):
        paper.policies_from_text("window:no_such_option=1")


def test_teacher_forced_traces_fit_the_paper_proportions(smollm, tmp_path):
    """Made-up GSM8K-format problems become several-problem traces long enough for 3 compressions at every budget,
    with a short prompt and an answer span; resuming adds nothing."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(160):
        a, b = 3 + i % 7, 11 + i % 5
        rows.append(
            {
                "id": f"train-{i:04d}",
                "question": f"Sam has {a} boxes with {b} marbles each. How many marbles does Sam have?",
                "answer": str(a * b),
                "solution": f"Sam has {a}*{b} = <<{a}*{b}={a * b}>>{a * b} marbles.\n#### {a * b}",
            }
        )
    (data / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = paper.PaperFrame((400, 500))
    out = tmp_path / "traces"
    source = paper.build_traces(smollm, "gsm8k", "train", str(data), frame, 4, out)
    assert "teacher-forced" in source
    keyed = paper.stored_traces(smollm, out)
    chosen, skipped = paper.select_traces(frame, keyed, limit=4)
    assert len(chosen) == 4 and not skipped
    ids = [p for key, _ in chosen for p in key[1].split("+")]
    assert len(ids) == len(set(ids)) and all(int(p.split("-")[1]) >= 80 for p in ids)  # the split's second half
    for _, t in chosen:
        answer = smollm.tokenizer.decode(t.token_ids[t.answer_start :])
        assert answer.strip().startswith("The answers are: (1) ") and len(t.prompt_ids) <= frame.max_prompt()
    paper.build_traces(smollm, "gsm8k", "train", str(data), frame, 4, out)
    assert len(paper.stored_traces(smollm, out)) == 4


def test_a_rerun_must_measure_the_same_thing(tmp_path):
    manifest = {"model": "m", "dataset": "gsm8k", "split": "train", "frame": [], "policies": ["full"], "head": None}
    paper.check_manifest(tmp_path, manifest)  # nothing there yet
    (tmp_path / "run.json").write_text(json.dumps({**manifest, "head_digest": "abc", "n_traces": 4}))
    (tmp_path / "per_trace.jsonl").write_text("")
    paper.check_manifest(tmp_path, {**manifest, "head_digest": "abc", "n_traces": 8})  # more traces: resumes
    with pytest.raises(DynTSError, match="head_digest"):
        paper.check_manifest(tmp_path, {**manifest, "head_digest": "def"})


def test_run_benchmark_appends_each_trace_and_resumes(make_tiny, tmp_path):
    """per_trace.jsonl goes through the store's appender: a line per trace, a torn tail cut, a rerun measures only
    the traces not stored, and a second writer is refused."""
    from dynts.harness.store import JsonlAppender

    loaded = make_tiny(vocab_size=64)
    frame = paper.PaperFrame((20, 30))
    greedy = SamplingConfig(greedy=True, max_new_tokens=1)
    engines = {("window", frame.config(b)): Engine(loaded, "window", frame.config(b), greedy, 1) for b in frame.budgets}
    engines["full", None] = Engine(loaded, "full", None, greedy, 1)
    keyed = [(["t", str(i)], Trace(list(range(1, 5)), [7 + i] * 60, 50)) for i in range(2)]
    manifest = {"model": loaded.name, "dataset": "x", "split": None, "frame": frame.describe(), "policies": ["window"]}
    first = paper.run_benchmark(loaded, keyed[:1], engines, tmp_path, manifest, progress=False)
    lines = (tmp_path / paper.PER_TRACE_FILE).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["key"] == ["t", "0"]
    with (tmp_path / paper.PER_TRACE_FILE).open("a") as handle:
        handle.write('{"key": ["t", "1"], "rec')  # a kill mid-write
    both = paper.run_benchmark(loaded, keyed, engines, tmp_path, manifest, progress=False)
    lines = (tmp_path / paper.PER_TRACE_FILE).read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [["t", "0"], ["t", "1"]]
    assert {r["traces"] for r in both} == {2} and {r["traces"] for r in first} == {1}
    with JsonlAppender(tmp_path / paper.PER_TRACE_FILE, lambda item: str(item["key"])):
        with pytest.raises(DynTSError, match="another DynTS process"):
            paper.run_benchmark(loaded, keyed, engines, tmp_path, manifest, progress=False)
