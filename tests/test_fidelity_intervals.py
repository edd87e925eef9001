"""Paired intervals and the tail of the fidelity benchmark (experiments/fidelity_intervals.py) on constructed
per-trace records: verdicts, counts, worst traces, merging runs, the files written."""

import json

import numpy as np
import pytest

from dynts.errors import DynTSError
from dynts.experiments import fidelity_intervals as fi
from dynts.harness.uncertainty import BootstrapConfig

CONTROL = "window:protect_prompt=true"


def record(label, budget, kl):
    name, _, option = label.partition(":")
    options = dict([option.split("=")]) if option else {}
    options = {k: (v == "true" if v in ("true", "false") else v) for k, v in options.items()}
    return {"policy": name, "options": options, "budget": budget, "kl_answer": kl}


def per_trace(table: dict[tuple[str, int], list[float]]) -> list[dict]:
    """Per-trace items from {(label, budget): [kl of trace 0, 1, ...]} (plus a full record per trace)."""
    n = len(next(iter(table.values())))
    return [
        {
            "key": ["gsm8k", f"p{i}+q{i}", 0],
            "records": [{"policy": "full", "options": {}, "budget": None, "kl_answer": 0.0}]
            + [record(label, b, kls[i]) for (label, b), kls in table.items()],
        }
        for i in range(n)
    ]


def test_clear_lead_clear_loss_and_noise():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.1, 0.3, size=12)
    items = per_trace(
        {
            ("dynts", 400): list(base),
            ("h2o:scope=shared", 400): list(base + 0.05 + rng.uniform(-0.01, 0.01, 12)),  # dynts lower on each
            ("streaming", 400): list(base - 0.04),  # dynts higher on every trace
            ("sepllm", 400): list(base + rng.normal(0, 0.05, 12)),  # noise around zero
        }
    )
    found = {d.rival: d for d in fi.paired_differences(items)}
    assert set(found) == {"h2o:scope=shared", "streaming", "sepllm"}  # full never compresses: no rival
    lead, loss, noise = found["h2o:scope=shared"], found["streaming"], found["sepllm"]
    assert lead.verdict == fi.LOWER and lead.lower_on == 12 and lead.traces == 12
    assert lead.mean == pytest.approx(-0.05, abs=0.01) and lead.low < lead.mean < lead.high < 0
    assert loss.verdict == fi.HIGHER and loss.lower_on == 0 and loss.low > 0
    assert noise.low < 0 < noise.high and noise.verdict == fi.UNCLEAR
    lines = fi.summary_lines(list(found.values()))
    assert any(line.endswith(": lower") and "h2o:scope=shared" in line and "12/12" in line for line in lines)
    assert any(line.endswith(": not distinguishable") for line in lines)


def test_intervals_are_seeded_and_paired():
    items = per_trace({("dynts", 400): [0.1, 0.2, 0.9, 0.3], ("window", 400): [0.2, 0.1, 1.0, 0.35]})
    a = fi.paired_differences(items)[0]
    b = fi.paired_differences(items)[0]
    assert (a.low, a.high) == (b.low, b.high)  # the same run gives the same interval
    other = fi.paired_differences(items, config=BootstrapConfig(seed=3))[0]
    assert (other.low, other.high) != (a.low, a.high)
    # paired: a shift shared by both policies on one trace (the 0.9 / 1.0 trace) does not widen the interval
    # beyond the spread of the differences themselves
    d = np.array([-0.1, 0.1, -0.1, -0.05])
    assert d.min() - 1e-9 <= a.low <= a.high <= d.max() + 1e-9
    assert a.lower_on == 3 and a.mean == pytest.approx(d.mean())


def test_budgets_are_kept_apart_and_missing_traces_are_unpaired():
    items = per_trace(
        {("dynts", 400): [0.1, 0.2, 0.3], ("window", 400): [0.3, 0.4, 0.5], ("window", 500): [0.0, 0.0, 0.0]}
    )
    items[2]["records"] = [r for r in items[2]["records"] if r["policy"] != "window"]  # trace 2 lacks window
    found = fi.paired_differences(items)
    assert [(d.budget, d.rival, d.traces) for d in found] == [(400, "window", 2)]  # no dynts at 500
    assert fi.paired_differences(items, rivals=["streaming"]) == []


def test_tail_worst_trace_and_twice_the_control():
    items = per_trace(
        {
            ("dynts", 500): [0.10, 0.461, 0.05, 0.20],
            (CONTROL, 500): [0.12, 0.048, 0.04, 0.09],
            ("streaming", 500): [0.30, 0.05, 0.05, 0.10],
        }
    )
    found = {t.policy: t for t in fi.tails(items, CONTROL)}
    mine = found["dynts"]
    assert mine.worst_trace == "gsm8k/p1+1" and mine.worst_kl == pytest.approx(0.461)
    assert mine.control_on_worst == pytest.approx(0.048)
    assert mine.over_control == 2  # 0.461 > 2 x 0.048 and 0.20 > 2 x 0.09; 0.05 is not > 2 x 0.04
    assert found["streaming"].over_control == 1 and found[CONTROL].over_control == 0
    assert mine.mean == pytest.approx(np.mean([0.10, 0.461, 0.05, 0.20]))
    assert all(t.over_control is None and t.control_on_worst is None for t in fi.tails(items, None))
    assert "0.4610" in fi.format_tails(list(found.values())) and "2/4" in fi.format_tails([mine])


def test_merge_runs_on_common_traces(tmp_path):
    first = per_trace({("dynts", 400): [0.3, 0.3, 0.3], ("window", 400): [0.2, 0.2, 0.2]})
    second = per_trace({("dynts:scores=oracle", 400): [0.1, 0.1], ("dynts", 400): [9.0, 9.0]})
    for name, items in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        lines = [json.dumps(item) for item in items]
        (tmp_path / name / "per_trace.jsonl").write_text("\n".join(lines) + "\n{torn")
    runs = [fi.read_per_trace(tmp_path / d / "per_trace.jsonl") for d in ("a", "b")]
    merged = fi.merge_per_trace(runs)
    assert [item["key"][1] for item in merged] == ["p0+q0", "p1+q1"]  # trace 2 is only in the first run
    table = fi.kl_table(merged)
    assert table["dynts", 400] == {"gsm8k/p0+1": 0.3, "gsm8k/p1+1": 0.3}  # the first run's dynts wins
    assert table["dynts:scores=oracle", 400]["gsm8k/p0+1"] == 0.1
    oracle = fi.paired_differences(merged, mine="dynts:scores=oracle", rivals=["window"])[0]
    assert oracle.mean == pytest.approx(-0.1) and oracle.lower_on == 2
    assert [i["key"][1] for i in fi.select(runs[0], [["gsm8k", "p2+q2", 0], ["gsm8k", "p0+q0", 0]])] == [
        "p2+q2",
        "p0+q0",
    ]
    with pytest.raises(DynTSError, match="no per-trace records"):
        fi.read_per_trace(tmp_path / "missing" / "per_trace.jsonl")


def test_report_files(tmp_path):
    items = per_trace({("dynts", 400): [0.1, 0.2, 0.3, 0.2], (CONTROL, 400): [0.2, 0.3, 0.4, 0.25]})
    differences, tails, text = fi.write_report(items, tmp_path, CONTROL)
    payload = json.loads((tmp_path / fi.INTERVALS_FILE).read_text())
    assert payload["differences"][0]["verdict"] == differences[0].verdict == fi.LOWER
    assert payload["differences"][0]["rival"] == CONTROL and payload["control"] == CONTROL
    assert payload["bootstrap"]["method"] == fi.METHOD and payload["bootstrap"]["resamples"] >= 100
    assert {t["policy"] for t in payload["tails"]} == {"dynts", CONTROL}
    assert text in (tmp_path / fi.INTERVALS_TABLE).read_text()


def test_too_few_traces_are_never_a_verdict():
    items = per_trace({("dynts", 400): [0.1, 0.2, 0.3], ("window", 400): [0.5, 0.6, 0.7]})
    (d,) = fi.paired_differences(items)
    assert d.high < 0 and d.lower_on == 3 and d.verdict == fi.UNCLEAR  # 3 < MIN_VERDICT_TRACES
    items = per_trace({("dynts", 400): [0.1, 0.2, 0.3, 0.2], ("window", 400): [0.5, 0.6, 0.7, 0.6]})
    assert fi.paired_differences(items)[0].verdict == fi.LOWER
