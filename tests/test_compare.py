"""dynts compare on stored tiny runs: pairing, what was dropped, the paired figures, the CLI and its errors.

The runs are written with ResultStore + write_report (no model), the CLI runs as `python -m dynts compare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynts.errors import DynTSError
from dynts.harness.compare import compare_runs, load_runs, shared_samples
from dynts.harness.report import write_report
from dynts.harness.store import ResultStore

SRC = Path(__file__).resolve().parents[1] / "src"


def write_run(
    directory: Path,
    datasets: dict[str, int],
    samples: int = 3,
    correct=lambda dataset, i, s: i % 2 == 0,
    length=lambda dataset, i, s: 100 + 10 * i + s,
    seconds=lambda tokens: tokens / 50,
    max_new_tokens: int = 300,
    temperature: float = 0.6,
    policy: str = "full",
) -> Path:
    """A run directory with made-up, graded samples; a sample stops at max_new_tokens when its length reaches it."""
    manifest = {
        "model": "tiny",
        "policy": {"name": policy, "registry_name": policy, "budget": None},
        "sampling": {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": 42},
        "samples": samples,
    }
    with ResultStore(directory, manifest) as store:
        for dataset, problems in datasets.items():
            for i in range(problems):
                for s in range(samples):
                    tokens = min(max_new_tokens, length(dataset, i, s))
                    store.append(
                        {
                            "dataset": dataset,
                            "id": f"{dataset}-{i}",
                            "sample": s,
                            "response": "",
                            "extracted": "1",
                            "correct": bool(correct(dataset, i, s)),
                            "gold": "1",
                            "kind": "math",
                            "prompt_tokens": 10,
                            "generated_tokens": tokens,
                            "stats": {
                                "generated_tokens": tokens,
                                "time_share_s": seconds(tokens),
                                "finish_reason": "length" if tokens >= max_new_tokens else "eos",
                            },
                        }
                    )
    write_report(directory)
    return directory


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dynts", "compare", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def rows_of(comparison: dict, run: str) -> dict[str, dict]:
    return {r["dataset"]: r for r in comparison["rows"] if r["run"] == run}


def test_cli_table_json_and_markdown_for_runs_differing_by_one_problem(tmp_path):
    a = write_run(tmp_path / "A", {"aime24": 30})
    b = write_run(tmp_path / "B", {"aime24": 30}, correct=lambda d, i, s: i % 2 == 0 or i == 1)
    out = tmp_path / "cmp"
    result = run_cli(a, b, "--out", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert not any(line.startswith("note:") for line in lines)  # same problems, samples and settings
    header = next(line for line in lines if line.startswith("run "))
    assert "pass@1 [95% CI]" in header and "diff vs A [95% CI]" in header and "trunc %" in header
    b_row = next(line for line in lines if line.startswith("B "))
    assert "+3.3 [" in b_row  # one problem of 30, right in all 3 samples

    comparison = json.loads((out / "compare.json").read_text())
    assert comparison["baseline"] == "A" and [r["label"] for r in comparison["runs"]] == ["A", "B"]
    row = rows_of(comparison, "B")["aime24"]
    assert row["diff"] == pytest.approx(1 / 30)
    assert row["p_value"] == 1.0  # one differing problem is no evidence: every swap is as extreme
    assert row["diff_ci"][0] <= 0 < row["diff"] <= row["diff_ci"][1]
    base = rows_of(comparison, "A")["aime24"]
    assert base["diff"] is None and base["p_value"] is None
    # the baseline's pass@1 interval is the one its report holds (same samples, same seed)
    report = json.loads((a / "metrics.json").read_text())["datasets"]["aime24"]
    assert base["pass@1"] == pytest.approx(report["pass@1"]) and base["pass@1_ci"] == report["pass@1_ci"]
    markdown = (out / "compare.md").read_text()
    assert "| B | aime24 | 30 | 90 |" in markdown and "permutation" in markdown
    # seeded: the same runs give the same comparison
    assert compare_runs([a, b]) == compare_runs([a, b])
    itself = compare_runs([a, a])  # a run against itself: no difference, labelled apart
    assert [r["label"] for r in itself["runs"]] == [f"{a}#1", f"{a}#2"]
    mine = rows_of(itself, f"{a}#2")["aime24"]
    assert mine["diff"] == 0 and mine["diff_ci"] == [0.0, 0.0] and mine["p_value"] == 1.0


def test_speed_length_and_truncation_figures(tmp_path):
    a = write_run(tmp_path / "A", {"aime24": 10, "amc23": 10}, length=lambda d, i, s: 100 + 20 * i)
    # B writes twice as much in the same time (TPS x2, lengths x2), so its longest problems hit max_new_tokens
    b = write_run(
        tmp_path / "B",
        {"aime24": 10, "amc23": 10},
        length=lambda d, i, s: 2 * (100 + 20 * i),
        seconds=lambda tokens: tokens / 100,
        max_new_tokens=10_000,
    )
    c = write_run(tmp_path / "C", {"aime24": 10, "amc23": 10}, length=lambda d, i, s: 100 + 40 * i)  # some hit 300
    comparison = compare_runs([a, b, c])
    b_rows, c_rows, a_rows = rows_of(comparison, "B"), rows_of(comparison, "C"), rows_of(comparison, "A")
    assert set(b_rows) == {"aime24", "amc23", "mean"}
    for dataset in ("aime24", "amc23", "mean"):
        assert b_rows[dataset]["tps_ratio"] == pytest.approx(2.0)
        assert b_rows[dataset]["mean_length_ratio"] == pytest.approx(2.0)
        assert b_rows[dataset]["p90_length_ratio"] == pytest.approx(2.0)
        assert b_rows[dataset]["truncation_rate"] == 0.0 and a_rows[dataset]["truncation_rate"] == 0.0
        assert b_rows[dataset]["diff"] == 0.0 and b_rows[dataset]["p_value"] == 1.0
    # C: 100 + 40 i >= 300 for i >= 5: half the samples truncated at 300
    assert c_rows["aime24"]["truncation_rate"] == pytest.approx(0.5)
    assert c_rows["aime24"]["p90_generated_tokens"] == 300
    lengths_c = [min(300, 100 + 40 * i) for i in range(10)]
    assert c_rows["aime24"]["mean_generated_tokens"] == pytest.approx(sum(lengths_c) / 10)


def test_real_difference_is_significant(tmp_path):
    a = write_run(tmp_path / "A", {"aime24": 30, "amc23": 40}, correct=lambda d, i, s: i % 3 == 0)
    b = write_run(tmp_path / "B", {"aime24": 30, "amc23": 40}, correct=lambda d, i, s: i % 3 != 2)
    comparison = compare_runs([a, b])
    mean = rows_of(comparison, "B")["mean"]
    assert mean["diff"] == pytest.approx((10 / 30 + 13 / 40) / 2)  # the mean over datasets of the differences
    assert 0 < mean["diff_ci"][0] < mean["diff"] < mean["diff_ci"][1]
    assert mean["p_value"] < 0.001
    lo, hi = mean["pass@1_ci"]
    assert lo < mean["pass@1"] < hi


def test_only_what_is_shared_is_compared_and_said_in_one_line(tmp_path):
    a = write_run(tmp_path / "A", {"aime24": 30, "amc23": 10}, samples=5)
    b = write_run(tmp_path / "B", {"aime24": 20}, samples=1, temperature=1.0)
    shared = shared_samples(load_runs([a, b]))
    assert list(shared.problems) == ["aime24"] and len(shared.problems["aime24"]) == 20
    assert all(indices == [0] for _, indices in shared.problems["aime24"])

    result = run_cli(a, b)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    note = notes[0]
    assert "dataset amc23 (only in A)" in note
    assert "10 aime24 problem(s) not in every run" in note
    assert "aime24 samples whose index is not in every run (80 of A)" in note
    assert "sampling.temperature: A 0.6, B 1.0" in note
    b_row = next(line for line in result.stdout.splitlines() if line.startswith("B "))
    assert b_row.split()[1:4] == ["aime24", "20", "20"]  # dataset, problems, samples


def test_errors_exit_2_and_write_nothing(tmp_path):
    a = write_run(tmp_path / "A", {"aime24": 5})
    other = write_run(tmp_path / "B", {"amc23": 5})
    out = tmp_path / "cmp"
    result = run_cli(a, other, "--out", out)
    assert result.returncode == 2
    assert (
        result.stderr.startswith("dynts: error: the runs share no problem")
        and "A: aime24 (5 problems)" in result.stderr
    )
    assert not out.exists()

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text("{}")
    empty = tmp_path / "empty"
    with ResultStore(empty, {"model": "tiny"}):
        pass
    for args, message in (
        ([a], "at least two run directories"),
        ([a, tmp_path / "missing"], "is not a dynts run or sweep-cell directory"),
        ([a, tmp_path / "sweep"], "it is a sweep directory"),
        ([a, empty], "holds no samples yet"),
    ):
        with pytest.raises(DynTSError, match=message):
            compare_runs(args)
    result = run_cli(a, tmp_path / "sweep", "--out", out)
    assert result.returncode == 2 and "it is a sweep directory" in result.stderr and not out.exists()
    result = run_cli(a, a, "--resamples", "5")
    assert result.returncode == 2 and "resamples must be at least 100" in result.stderr
