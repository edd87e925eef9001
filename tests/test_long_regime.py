"""The long regime of the fidelity benchmark (experiments/long_regime.py): its frame, answer items and their
sources in a teacher-forced several-problem trace, the curve of item KL against compressions survived."""

import pytest
import torch

from dynts.errors import DynTSError
from dynts.experiments import long_regime as long
from dynts.experiments.fidelity import Trace
from dynts.harness.datasets import Problem
from dynts.predictor.solution_traces import build_trace


def test_long_frame():
    frame = long.LongFrame()
    assert frame.budgets == (512, 768)
    assert [d["window"] for d in frame.describe()] == [204, 307]  # floor(0.4 B): 512 is no multiple of 5
    assert frame.kept(512) == 204 + int(0.4 * 308) == 327
    n = frame.min_length()
    assert n >= long.LONG_MIN_TOKENS and frame.compressions(n, 512) >= long.LONG_COMPRESSIONS
    assert frame.min_compressions == long.LONG_COMPRESSIONS
    assert frame.max_prompt() == int(0.2 * 327)
    with pytest.raises(DynTSError):
        long.LongFrame((512,))
    policies = long.default_policies()
    assert {"dynts", "dynts-random", "dynts-bottom", "dynts-noquestion", "window:protect_prompt=true"} <= set(policies)
    assert "h2o:scope=shared" in policies and "h2o" in policies


def problem(i, value):
    return Problem(
        "gsm8k",
        f"t{i}",
        f"Tom has {i} apples and buys {value - i} more. How many?",
        str(value),
        "math",
        solution=f"Tom has {i} + {value - i} = <<{i}+{value - i}={value}>>{value} apples.\n#### {value}",
    )


def test_answer_items_point_at_their_sources(smollm):
    problems = [problem(i, 10 * i + 7) for i in range(1, 6)]
    built = build_trace(smollm, problems)
    trace = Trace(built.prompt_ids, built.token_ids, built.answer_start)
    items = long.answer_items(smollm, trace)
    assert [item.number for item in items] == [1, 2, 3, 4, 5]
    tok = smollm.tokenizer
    for item, p in zip(items, problems):
        assert item.start >= trace.answer_start and item.end > item.start
        text = tok.decode(trace.token_ids[item.start : item.end])
        assert f"({item.number})" in text and p.gold in text
        source = tok.decode(trace.token_ids[item.source : item.source + 3])
        assert p.gold[:2] in source  # the result's last mention in problem i's block
        assert item.source < trace.answer_start
    assert [i.source for i in items] == sorted(i.source for i in items)
    assert long.answer_items(smollm, Trace(trace.prompt_ids, trace.token_ids, None)) == []


def test_item_curves_and_the_table(tmp_path):
    trace = Trace([0] * 3, list(range(40)), 30)
    items = [long.AnswerItem(1, 30, 34, 5), long.AnswerItem(2, 34, 40, 25)]
    kl = torch.zeros(40)
    kl[30:34], kl[34:40] = 0.4, 0.1
    before = torch.zeros(40, dtype=torch.long)
    before[10:], before[20:], before[28:] = 1, 2, 3
    rows = long.item_curves(trace, items, kl, before)
    assert rows == [[1, 3, pytest.approx(0.4)], [2, 1, pytest.approx(0.1)]]
    per_trace = [
        {"key": ["gsm8k", "a", 0], "items": {"dynts|512": rows, "window|512": [[1, 3, 0.6], [2, 1, 0.05]]}},
        {"key": ["gsm8k", "b", 0], "items": {"dynts|512": [[1, 12, 0.9]]}},
    ]
    table = long.curve_table(per_trace)
    assert table[512]["dynts"]["2-3"] == (pytest.approx(0.4), 1)
    assert table[512]["dynts"]["0-1"] == (pytest.approx(0.1), 1)
    assert table[512]["dynts"]["12+"] == (pytest.approx(0.9), 1)
    assert table[512]["window"]["2-3"][0] == pytest.approx(0.6)
    text = long.write_curve(per_trace, tmp_path)
    assert "12+" in text and (tmp_path / long.CURVE_FILE).is_file() and (tmp_path / "curve.md").is_file()


def test_run_long_writes_records_items_and_the_curve_and_resumes(smollm, tmp_path):
    from dynts.experiments.fidelity import build_engines
    from dynts.experiments.fidelity_intervals import read_per_trace

    problems = [problem(i, 10 * i + 7) for i in range(1, 6)]
    built = build_trace(smollm, problems)
    trace = Trace(built.prompt_ids, built.token_ids, built.answer_start)
    engines = build_engines(smollm, ["full", "window", "window:protect_prompt=true"], [160], 24, 0.6)
    keyed = [(["gsm8k", "t1+t2+t3+t4+t5", 0], trace)]
    manifest = {"model": smollm.name, "policies": ["full", "window"]}
    records = long.run_long(smollm, keyed, engines, tmp_path, manifest, progress=False)
    assert {(r["policy"], r["budget"]) for r in records} == {("full", None), ("window", 160), ("window", 160)}
    stored = read_per_trace(tmp_path / "per_trace.jsonl")
    (item,) = stored.values()
    rows = item["items"]["window|160"]
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    survived = [r[1] for r in rows]
    assert (
        survived == sorted(survived, reverse=True) and survived[0] > survived[-1]
    )  # the first result survived the most
    assert all(r[2] >= 0 for r in rows)
    assert (tmp_path / "curve.md").is_file() and (tmp_path / "fidelity.json").is_file()
    before = (tmp_path / "per_trace.jsonl").read_text()
    long.run_long(smollm, keyed, engines, tmp_path, manifest, progress=False)  # resumes: nothing replayed again
    assert (tmp_path / "per_trace.jsonl").read_text() == before
