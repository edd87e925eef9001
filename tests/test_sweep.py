"""dynts sweep / dynts plot: grid syntax and validation, resumable cells, summary.csv, figures and their CSVs.

The sweeps run the embedded SmolLM2-135M on the first demo problem(s) with a handful of tokens, so the whole
module takes well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from dynts.config import SamplingConfig
from dynts.errors import DynTSError
from dynts.experiments.sweep import (
    SUMMARY_COLUMNS,
    SweepSpec,
    load_cells,
    parse_float_list,
    parse_int_list,
    read_csv,
    read_steps,
    run_sweep,
    write_summary,
)
from dynts.harness.report import write_report
from dynts.harness.store import ResultStore, read_records


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding a 135M model on a shared 2-core machine is much faster on one thread; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_spec(**overrides) -> SweepSpec:
    options = dict(
        model="smollm2-135m",
        policies=["full", "window"],
        budgets=[60, 64],
        windows=[8],
        ratios=[0.5, 0.75],
        datasets=["demo"],
        samples=1,
        limit=1,
        sampling=SamplingConfig(max_new_tokens=8),
        batch_size=8,
        probe_tokens=16,
    )
    options.update(overrides)
    return SweepSpec(**options)


def no_load():
    raise AssertionError("the model must not be loaded")


@pytest.fixture(scope="module")
def stored_sweep(tmp_path_factory, smollm):
    """full + window at B in {60, 64}, W=8, r in {0.5, 0.75}: five cells, each with a step trace.

    The first demo prompt has 51 tokens, so 8 generated tokens stay under every budget while the 16-token
    probe compresses in every window cell."""
    out = tmp_path_factory.mktemp("sweep") / "S"
    result = run_sweep(tiny_spec(), out, loaded=smollm, progress=False)
    assert sorted(result.ran) == sorted(
        ["full", "window-B60-W8-r0.5", "window-B60-W8-r0.75", "window-B64-W8-r0.5", "window-B64-W8-r0.75"]
    )
    return out


def metrics_of(sweep: Path, cell: str, dataset: str = "demo") -> dict:
    return json.loads((sweep / "cells" / cell / "metrics.json").read_text())["datasets"][dataset]


def close(a, b) -> bool:
    if a in (None, "") or b in (None, ""):
        return a in (None, "") and b in (None, "")
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-12)


# --------------------------------------------------------------------------- grid syntax and validation


def test_parse_lists():
    assert parse_int_list("2500:5000:500") == [2500, 3000, 3500, 4000, 4500, 5000]
    assert parse_int_list("5000, 2500,2500") == [2500, 5000]
    assert parse_int_list("96:128:16,200") == [96, 112, 128, 200]
    assert parse_int_list("10:25:10") == [10, 20]
    assert parse_float_list("0.2:0.5:0.1") == [0.2, 0.3, 0.4, 0.5]
    assert parse_float_list("0.3,0.4") == [0.3, 0.4]
    for bad in ("", "a", "2500:5000", "5000:2500:500", "1:2:0", "1,,2", "1:2:3:4", "2.5"):
        with pytest.raises(DynTSError):
            parse_int_list(bad, "--budgets")
    with pytest.raises(DynTSError):
        parse_float_list("0.1:nan:0.1")


def test_every_figure_kind_has_one_builder():
    """config.FIGURE_KINDS (what `dynts plot --help` lists) and the builders of experiments.plots name the same
    figures, in the same order."""
    from dynts.config import FIGURE_KINDS
    from dynts.experiments import plots

    assert tuple(plots._BUILDERS) == FIGURE_KINDS == plots.KINDS


def test_parse_names_one_grammar_for_every_name_list():
    """--datasets, --policies and --kind (eval, sweep, fidelity, plot, the paper benchmark) read names alike."""
    from dynts.config import parse_names

    assert parse_names(" gsm8k, math500,gsm8k,", "--datasets") == ["gsm8k", "math500"]
    for bad in ("", " , ", ","):
        with pytest.raises(DynTSError, match="--kind names nothing"):
            parse_names(bad, "--kind")


def test_parse_widths_one_grammar_for_hidden_and_head_layers():
    """`dynts train --hidden` and `dynts bench --head-layers` read layer widths by config.parse_widths."""
    from dynts.config import parse_widths

    assert parse_widths("8192,2048", "--hidden") == (8192, 2048)
    assert parse_widths(" 512, 128,", "--head-layers") == (512, 128)
    for bad in ("", ",", "a,1", "512,0", "-4", "2.5"):
        with pytest.raises(DynTSError, match="--hidden takes comma-separated positive layer widths"):
            parse_widths(bad, "--hidden")


def test_bad_grids_fail_before_writing(tmp_path):
    out = tmp_path / "S"
    with pytest.raises(DynTSError, match=r"window-B64-W64-r0.5.*smaller than --budget"):
        run_sweep(tiny_spec(budgets=[64], windows=[8, 64], ratios=[0.5]), out, load=no_load, progress=False)
    with pytest.raises(DynTSError, match="unknown policy 'nope'"):
        run_sweep(tiny_spec(policies=["full", "nope"]), out, load=no_load, progress=False)
    with pytest.raises(DynTSError, match="keeps every token"):
        run_sweep(tiny_spec(budgets=[64], windows=[8], ratios=[1.0]), out, load=no_load, progress=False)
    with pytest.raises(DynTSError, match="unknown dataset"):
        run_sweep(tiny_spec(datasets=["nope"]), out, load=no_load, progress=False)
    assert not out.exists()
    # --skip-invalid leaves the bad cells out instead
    spec = tiny_spec(budgets=[64], windows=[8, 64], ratios=[0.5], skip_invalid=True)
    assert [c.name for c in spec.cells()] == ["full", "window-B64-W8-r0.5"]
    assert len(spec.skipped) == 1 and spec.skipped[0].startswith("window-B64-W64-r0.5")


@pytest.mark.slow
def test_prompt_that_does_not_fit_fails_before_writing(tmp_path, smollm):
    out = tmp_path / "S"
    # the first demo prompt has 51 tokens with the chat template: 51 + W=8 does not fit under B=56
    with pytest.raises(DynTSError, match=r"window-B56-W8-r0.5.*does not fit under --budget 56"):
        run_sweep(tiny_spec(budgets=[56, 64], ratios=[0.5]), out, loaded=smollm, progress=False)
    assert not out.exists()


def test_cli_bad_flags_fail_before_writing(tmp_path):
    parser = build_parser()
    out = tmp_path / "S"
    for flags in (
        ["--budgets", "64:96"],
        ["--windows", "64", "--budgets", "64"],
        ["--policies", "full,bogus"],
        ["--ratios", "x"],
        ["--samples", "0"],
    ):
        args = parser.parse_args(["sweep", "--out", str(out), *flags])
        with pytest.raises(DynTSError):
            args.func(args)
    assert not out.exists()


@pytest.mark.slow
def test_default_grid_is_small_and_valid(tmp_path, smollm):
    from dynts.cli.sweep import spec_from_args
    from dynts.experiments.sweep.run import _validate_against_model

    args = build_parser().parse_args(["sweep", "--model", "smollm2-135m", "--out", str(tmp_path / "S")])
    spec = spec_from_args(args)
    assert spec.datasets == ["demo"] and spec.limit == 4 and spec.sampling.max_new_tokens == 128
    assert {"full", "window", "rkv"} <= set(spec.policies)
    cells = spec.cells()
    assert len(cells) <= 10
    problems = __import__("dynts.harness.datasets", fromlist=["load_dataset"]).load_dataset("demo", limit=spec.limit)
    _validate_against_model(spec, cells, smollm, problems)  # every prompt fits every cell (dynts: the head loads)


# --------------------------------------------------------------------------- running and resuming


@pytest.mark.slow
def test_sweep_writes_cells_summary_and_traces(stored_sweep):
    for cell in load_cells(stored_sweep):
        directory = stored_sweep / "cells" / cell.name
        for name in ("run.json", "samples.jsonl", "metrics.json", "report.md", "steps.jsonl", "probe.json"):
            assert (directory / name).is_file(), (cell.name, name)
        steps = read_steps(directory)
        assert len(steps) == 15  # 16 probe tokens: the first comes from the prefill
        assert {
            "batch",
            "step",
            "active",
            "step_time_s",
            "forward_time_s",
            "kv_tokens",
            "kv_bytes",
            "compressed",
        } <= set(steps[0])
        if cell.compresses:
            assert max(s["kv_tokens"] for s in steps) <= cell.budget
            assert sum(s["compressed"] for s in steps) >= 1
    sweep = json.loads((stored_sweep / "sweep.json").read_text())
    assert sweep["shared"]["samples"] == 1 and sweep["grid"]["budgets"] == [60, 64]
    rows = read_csv(stored_sweep / "summary.csv")
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    assert len(rows) == 5 and sum(r["policy"] == "full" for r in rows) == 1
    full = next(r for r in rows if r["policy"] == "full")
    assert full["budget"] == full["window"] == full["ratio"] == ""
    for row in rows:
        m = metrics_of(stored_sweep, row["cell"])
        for key in (
            "pass@1",
            "pass@k",
            "maj@k",
            "tps",
            "tps_forward",
            "peak_kv_tokens",
            "mean_generated_tokens",
            "median_generated_tokens",
            "p90_generated_tokens",
            "truncation_rate",
        ):
            assert close(row[key], m[key]), (row["cell"], key)
        assert close(row["pass@1_lo"], m["pass@1_ci"][0]) and close(row["pass@1_hi"], m["pass@1_ci"][1])


@pytest.mark.slow
def test_rerun_of_finished_sweep_loads_nothing(stored_sweep):
    before = {p: p.stat().st_mtime_ns for p in stored_sweep.glob("cells/*/samples.jsonl")}
    result = run_sweep(tiny_spec(), stored_sweep, load=no_load, progress=False)
    assert result.ran == [] and len(result.skipped_done) == 5
    assert {p: p.stat().st_mtime_ns for p in stored_sweep.glob("cells/*/samples.jsonl")} == before


@pytest.mark.slow
def test_different_shared_flags_are_refused(stored_sweep):
    sweep_json = (stored_sweep / "sweep.json").read_text()
    with pytest.raises(DynTSError, match=r"samples: stored 1, now 2"):
        run_sweep(tiny_spec(samples=2), stored_sweep, load=no_load, progress=False)
    with pytest.raises(DynTSError, match=r"sampling.temperature"):
        run_sweep(
            tiny_spec(sampling=SamplingConfig(max_new_tokens=8, temperature=0.7)),
            stored_sweep,
            load=no_load,
            progress=False,
        )
    with pytest.raises(DynTSError, match=r"model: stored"):
        run_sweep(tiny_spec(model="other/model"), stored_sweep, load=no_load, progress=False)
    assert (stored_sweep / "sweep.json").read_text() == sweep_json


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_work(tmp_path, smollm):
    out = tmp_path / "S"
    spec = dict(policies=["full", "window"], budgets=[72], ratios=[0.5], limit=2, batch_size=1, trace_steps=False)
    run_sweep(tiny_spec(**spec), out, loaded=smollm, progress=False)
    full_samples = out / "cells" / "full" / "samples.jsonl"
    window = out / "cells" / "window-B72-W8-r0.5"
    full_bytes, full_mtime = full_samples.read_bytes(), full_samples.stat().st_mtime_ns
    lines = (window / "samples.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 2
    # simulate a crash after the window cell's first sample: one record stored, no report yet
    (window / "samples.jsonl").write_text(lines[0])
    (window / "metrics.json").unlink()
    (window / "report.md").unlink()

    result = run_sweep(tiny_spec(**spec), out, loaded=smollm, progress=False)
    assert result.ran == ["window-B72-W8-r0.5"] and result.skipped_done == ["full"]
    assert full_samples.read_bytes() == full_bytes and full_samples.stat().st_mtime_ns == full_mtime
    records = [json.loads(line) for line in (window / "samples.jsonl").read_text().splitlines()]
    keys = [(r["dataset"], r["id"], r["sample"]) for r in records]
    assert len(keys) == 2 and len(set(keys)) == 2
    assert (window / "samples.jsonl").read_text().startswith(lines[0])
    assert metrics_of(out, "window-B72-W8-r0.5")["complete"]

    # a rerun with a larger grid extends the sweep: only the new cell runs
    result = run_sweep(tiny_spec(**{**spec, "budgets": [72, 80]}), out, loaded=smollm, progress=False)
    assert result.ran == ["window-B80-W8-r0.5"]
    assert json.loads((out / "sweep.json").read_text())["grid"]["budgets"] == [72, 80]
    assert len(read_csv(out / "summary.csv")) == 3
    assert full_samples.stat().st_mtime_ns == full_mtime


# --------------------------------------------------------------------------- figures


@pytest.mark.slow
def test_plot_writes_every_kind_with_matching_csv(stored_sweep, tmp_path):
    pytest.importorskip("matplotlib")
    from dynts.experiments.plots import plot_sweeps

    figdir = tmp_path / "figs"
    written = plot_sweeps(stored_sweep, out_dir=figdir)
    assert set(written) == {"budget", "heatmap", "methods", "steps", "lengths"}
    for kind, paths in written.items():
        assert [p.name for p in paths] == [f"{kind}.png", f"{kind}.pdf", f"{kind}.csv"]
        assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"

    # budget: one bar per window cell at its (W, r) pick (r=0.5 covers both budgets, ties go to the smaller r)
    rows = read_csv(figdir / "budget.csv")
    bars = [r for r in rows if r["role"] == "bar"]
    assert sorted(r["cell"] for r in bars) == ["window-B60-W8-r0.5", "window-B64-W8-r0.5"]
    assert [r["cell"] for r in rows if r["role"] == "fullkv"] == ["full"]
    for row in rows:
        m = metrics_of(stored_sweep, row["cell"], row["dataset"])
        assert close(row["pass@1_pct"], 100 * m["pass@1"]) and close(row["tps"], m["tps"])

    # heatmap: W x r at the largest budget with more than one r
    rows = read_csv(figdir / "heatmap.csv")
    assert sorted(r["cell"] for r in rows) == ["window-B64-W8-r0.5", "window-B64-W8-r0.75"]
    for row in rows:
        assert close(row["pass@1_pct"], 100 * metrics_of(stored_sweep, row["cell"])["pass@1"])

    rows = read_csv(figdir / "methods.csv")
    assert [(r["role"], r["cell"]) for r in rows] == [("bar", "window-B64-W8-r0.5"), ("fullkv", "full")]
    for row in rows:
        m = metrics_of(stored_sweep, row["cell"])
        assert close(row["pass@1_pct"], 100 * m["pass@1"]) and close(row["tps"], m["tps"])

    rows = read_csv(figdir / "lengths.csv")
    assert {r["cell"] for r in rows} == {"full", "window-B64-W8-r0.5"}
    for cell in ("full", "window-B64-W8-r0.5"):
        stored = read_records(stored_sweep / "cells" / cell)
        mine = [r for r in rows if r["cell"] == cell]
        assert sorted(int(float(r["generated_tokens"])) for r in mine) == sorted(
            r["stats"]["generated_tokens"] for r in stored
        )

    rows = read_csv(figdir / "steps.csv")
    assert {r["cell"] for r in rows} == {"full", "window-B64-W8-r0.5"}
    for cell in ("full", "window-B64-W8-r0.5"):
        steps = read_steps(stored_sweep / "cells" / cell)
        mine = [r for r in rows if r["cell"] == cell]
        assert len(mine) == len(steps)
        for row, step in zip(mine, steps):
            assert int(row["step"]) == step["step"] and int(row["kv_tokens"]) == step["kv_tokens"]
            assert close(row["tps"], step["active"] / step["step_time_s"])
            assert close(row["kv_mib"], step["kv_bytes"] / 2**20)


@pytest.mark.slow
def test_plot_cli_kinds_and_errors(stored_sweep, tmp_path):
    pytest.importorskip("matplotlib")
    parser = build_parser()
    args = parser.parse_args(["plot", str(stored_sweep), "--kind", "budget", "--out", str(tmp_path / "f")])
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["budget.csv", "budget.pdf", "budget.png"]
    args = parser.parse_args(
        ["plot", str(stored_sweep), "--kind", "heatmap", "--budget", "99", "--out", str(tmp_path / "g")]
    )
    with pytest.raises(DynTSError, match="cannot draw the heatmap"):
        args.func(args)
    args = parser.parse_args(["plot", str(tmp_path / "missing")])
    with pytest.raises(DynTSError):
        args.func(args)


def build_parser() -> argparse.ArgumentParser:
    from dynts.cli.sweep import register

    parser = argparse.ArgumentParser(prog="dynts")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def fake_cell(root: Path, model: str, policy: str, budget=None, window=None, ratio=None, datasets=("aime24", "amc23")):
    """A finished cell as dynts sweep writes it (run.json + metrics.json), with made-up numbers."""
    from dynts.experiments.sweep import Cell

    name = f"{model.split('/')[-1]}-{Cell(policy, budget, window, ratio).name}"
    directory = root / "cells" / name
    directory.mkdir(parents=True)
    (directory / "run.json").write_text(
        json.dumps(
            {
                "model": model,
                "policy": {"name": policy, "registry_name": policy, "budget": budget, "window": window, "ratio": ratio},
            }
        )
    )
    seed = sum(map(ord, name))
    rows = {
        d: {
            "n_problems": 30,
            "samples_per_problem": 5,
            "complete": True,
            "k": 5,
            "pass@1": (seed % 97) / 97 / (i + 1),
            "pass@k": 0.5,
            "maj@k": 0.4,
            "tps": 100.0 + seed % 13 + i,
            "tps_forward": 150.0,
            "peak_kv_tokens": budget or 9000,
            "mean_generated_tokens": 5000.0,
        }
        for i, d in enumerate(datasets)
    }
    (directory / "metrics.json").write_text(json.dumps({"datasets": rows, "mean": {}}))
    return name


def test_plot_layout_for_several_models_and_datasets(tmp_path):
    pytest.importorskip("matplotlib")
    from dynts.experiments.plots import plot_sweeps

    root = tmp_path / "S"
    for model in ("org/Model-A", "org/Model-B"):
        fake_cell(root, model, "full")
        for policy in ("rkv", "dynts"):
            for budget in (2500, 3000):
                fake_cell(root, model, policy, budget, 2000, 0.4)
            fake_cell(root, model, policy, 3000, 1000, 0.4)  # a second W at B=3000: heatmap, not budget bars
    written = plot_sweeps(root, kinds=["budget", "heatmap", "methods"])
    assert all(p.is_file() for paths in written.values() for p in paths)
    budget = read_csv(root / "figures" / "budget.csv")
    # per model and dataset: 2 policies x 2 budgets at W=2000 (it covers the most budgets) + FullKV
    assert len(budget) == 2 * 2 * (2 * 2 + 1)
    assert {r["window"] for r in budget if r["role"] == "bar"} == {"2000"}
    heatmap = read_csv(root / "figures" / "heatmap.csv")
    assert len(heatmap) == 2 * 2 * 2 * 2 and {r["budget"] for r in heatmap} == {"3000"}
    methods = read_csv(root / "figures" / "methods.csv")
    assert {r["budget"] for r in methods if r["role"] == "bar"} == {"3000"}
    for row in budget + heatmap + methods:
        m = json.loads((root / "cells" / row["cell"] / "metrics.json").read_text())["datasets"][row["dataset"]]
        assert close(row["pass@1_pct"], 100 * m["pass@1"])
    with pytest.raises(DynTSError, match="cannot draw the steps figure"):
        plot_sweeps(root, kinds=["steps"])


def stored_cell(root: Path, policy: str, budget=None, accuracy=0.5, length=400, samples=3, max_new_tokens=1000):
    """A finished cell as dynts sweep writes it, from made-up samples stored with ResultStore + write_report."""
    from dynts.experiments.sweep import Cell

    cell = Cell(policy, budget, 16 if budget else None, 0.5 if budget else None)
    manifest = {
        "model": "org/Model",
        "policy": {
            "name": policy,
            "registry_name": policy,
            "budget": budget,
            "window": cell.window,
            "ratio": cell.ratio,
            "options": {},
        },
        "sampling": {"max_new_tokens": max_new_tokens},
    }
    with ResultStore(root / "cells" / cell.name, manifest) as store:
        for dataset, problems in (("aime24", 30), ("amc23", 40)):
            for i in range(problems):
                for s in range(samples):
                    tokens = min(max_new_tokens, length + 37 * ((i * 7 + s * 3) % 11) - 150)
                    store.append(
                        {
                            "dataset": dataset,
                            "id": str(i),
                            "sample": s,
                            "response": "",
                            "extracted": "1",
                            "correct": (i * 13 + s * 5) % 100 < 100 * accuracy,
                            "gold": "1",
                            "kind": "math",
                            "prompt_tokens": 10,
                            "generated_tokens": tokens,
                            "stats": {
                                "generated_tokens": tokens,
                                "time_share_s": tokens / 50,
                                "finish_reason": "length" if tokens == max_new_tokens else "eos",
                            },
                        }
                    )
    write_report(root / "cells" / cell.name)
    return cell.name


def test_intervals_and_lengths_reach_summary_and_figures(tmp_path):
    """Cells with stored samples: summary.csv carries the interval and length columns after the old ones, the
    budget/methods CSVs the interval drawn as whiskers, and the lengths figure every sample's length."""
    pytest.importorskip("matplotlib")
    from dynts.experiments.plots import plot_sweeps

    root = tmp_path / "S"
    stored_cell(root, "full", accuracy=0.6, length=500)
    for budget, accuracy in ((96, 0.3), (128, 0.5)):
        stored_cell(root, "window", budget, accuracy=accuracy, length=800)
    write_summary(root)
    rows = read_csv(root / "summary.csv")
    header = list(rows[0])
    assert header[: header.index("cell") + 1] == list(SUMMARY_COLUMNS[: SUMMARY_COLUMNS.index("cell") + 1])
    for row in rows:
        m = metrics_of(root, row["cell"], row["dataset"])
        assert float(row["pass@1_lo"]) < float(row["pass@1"]) < float(row["pass@1_hi"])
        assert close(row["pass@1_lo"], m["pass@1_ci"][0]) and close(row["truncation_rate"], m["truncation_rate"])
    window = [r for r in rows if r["policy"] == "window"]
    assert all(float(r["truncation_rate"]) > 0 for r in window)  # 800 + up to 220 tokens: some hit 1000

    written = plot_sweeps(root, kinds=["budget", "methods", "lengths"])
    for kind in ("budget", "methods"):
        drawn = read_csv(written[kind][2])
        assert drawn
        for row in drawn:
            lo, hi = metrics_of(root, row["cell"], row["dataset"])["pass@1_ci"]
            assert close(row["pass@1_lo_pct"], 100 * lo) and close(row["pass@1_hi_pct"], 100 * hi)
            assert float(row["pass@1_lo_pct"]) <= float(row["pass@1_pct"]) <= float(row["pass@1_hi_pct"])
    lengths = read_csv(written["lengths"][2])
    assert {r["cell"] for r in lengths} == {"full", "window-B128-W16-r0.5"}  # methods' pick: the largest budget
    for cell in ("full", "window-B128-W16-r0.5"):
        stored = read_records(root / "cells" / cell)
        mine = [r for r in lengths if r["cell"] == cell]
        assert len(mine) == len(stored)
        assert sorted(float(r["generated_tokens"]) for r in mine) == sorted(
            r["stats"]["generated_tokens"] for r in stored
        )
        truncated = sum(r["finish_reason"] == "length" for r in mine)
        assert truncated == sum(r["stats"]["finish_reason"] == "length" for r in stored)
    fake_cell(tmp_path / "fake", "org/M", "full")  # metrics.json only, no samples.jsonl
    with pytest.raises(DynTSError, match="cannot draw the lengths figure"):
        plot_sweeps(tmp_path / "fake", kinds=["lengths"])
