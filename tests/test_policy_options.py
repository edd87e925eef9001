"""Policy options: reachable from the CLI (--policy-opt, NAME:KEY=VALUE), the Python API and sweep grids; listed
by `dynts policies`; part of run.json, so a resume with a changed option is refused, naming it; and a bad option
is one `dynts: error:` line naming the valid ones, with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dynts.api import generate, make_engine
from dynts.config import BudgetConfig, SamplingConfig
from dynts.errors import DynTSError
from dynts.policies import POLICIES, budget_for, make_policy, policy_config
from dynts.policies.options import describe, format_spec, parse_spec
from dynts.policies.registry import resolve_spec


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", os.environ.get("DYNTS_TEST_THREADS", "1"))
    return subprocess.run(
        [sys.executable, "-m", "dynts", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


EVAL = [
    "eval",
    "--model",
    "smollm2-135m",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--datasets",
    "demo",
    "--limit",
    "1",
    "--samples",
    "1",
    "--greedy",
    "--max-new-tokens",
    "8",
    "--budget",
    "96",
    "--window",
    "16",
    "--ratio",
    "0.5",
]


def test_options_convert_validate_and_name_the_valid_ones():
    budget = BudgetConfig(100, 10, 0.5)
    assert make_policy("snapkv", budget, {"observation": "16", "kernel": "5"}).config.observation == 16
    assert make_policy("dynts-noquestion", budget, {}).config != make_policy("dynts", budget, {}).config
    with pytest.raises(DynTSError, match=r"no option 'windoww'.*observation \(int, default 32\)"):
        policy_config("snapkv", {"windoww": "3"})
    with pytest.raises(DynTSError, match="option observation takes int, got 'many'"):
        policy_config("snapkv", {"observation": "many"})
    with pytest.raises(DynTSError, match="kernel odd"):
        policy_config("snapkv", {"kernel": "4"})
    with pytest.raises(DynTSError, match="has no options"):
        policy_config("full", {"anything": "1"})
    assert parse_spec("rkv:lam=0.2:threshold=0.7") == ("rkv", {"lam": "0.2", "threshold": "0.7"})
    assert format_spec("rkv", {"lam": 0.2}) == "rkv:lam=0.2"
    # a list entry keeps only the options that differ from the policy's defaults (so rkv:lam=0.1 is plain rkv)
    assert resolve_spec("rkv:lam=0.1") == ("rkv", ())
    assert resolve_spec("rkv", {"lam": "0.3", "sinks": "2"}) == ("rkv", (("lam", 0.3),))


def test_every_policy_lists_its_options():
    proc = run_cli("policies")
    assert proc.returncode == 0, proc.stderr
    for name, (cls, _preset) in POLICIES.items():
        assert f"\n{name}\n" in f"\n{proc.stdout}", name
        for option, _kind, _default, _help in describe(cls.Config):
            assert f"{option}=" in proc.stdout
    assert "dynts-random\n    = dynts:" in proc.stdout  # a preset shows as its base policy with options


@pytest.mark.slow
def test_python_api_takes_policy_options(smollm):
    prompt = [smollm.tokenizer.encode("The following is a list of fruits: apples, pears,")]
    sampling = SamplingConfig(greedy=True, max_new_tokens=30, ignore_eos=True)
    budget = budget_for("streaming", 40, 4, 0.5)
    kept = {}
    for sinks in (10, 2):
        engine = make_engine(smollm, "streaming", budget, sampling, policy_options={"sinks": sinks})
        assert engine.policy.config.sinks == sinks
        assert engine.generate(prompt, chat=False).results[0].stats.compressions >= 1
        cache = engine.last_cache
        kept[sinks] = cache.slot["position"][0, : cache.lengths[0]].tolist()
    assert kept[10][:10] == list(range(10)) and kept[2][:2] == [0, 1] and kept[2][2] > 2  # the sinks survive
    with pytest.raises(DynTSError, match="no option 'sink'"):
        generate(smollm, prompt, policy="streaming", budget=40, window=4, ratio=0.5, policy_options={"sink": 2})


@pytest.mark.slow
def test_cli_option_errors_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "run"
    for option, expected in (
        ("windoww=3", ["no option 'windoww'", "observation (int, default 32)"]),
        ("observation=lots", ["takes int, got 'lots'", "kernel (int, default 7)"]),
        ("observation", ["takes KEY=VALUE"]),
    ):
        proc = run_cli(*EVAL, "--policy", "snapkv", "--policy-opt", option, "--out", str(out))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dynts: error:"), proc.stderr
        assert all(text in lines[0] for text in expected), lines[0]
        assert not out.exists()


@pytest.mark.slow
def test_options_are_recorded_and_a_changed_one_refuses_the_resume(tmp_path):
    out = tmp_path / "run"
    done = run_cli(*EVAL, "--policy", "snapkv", "--policy-opt", "observation=16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["policy"]["options"] == {"observation": 16, "kernel": 7, "scope": "per-head"}
    again = run_cli(*EVAL, "--policy", "snapkv", "--policy-opt", "observation=16", "--out", str(out))
    assert again.returncode == 0, again.stderr  # the same options resume
    before = (out / "samples.jsonl").read_text()
    changed = run_cli(*EVAL, "--policy", "snapkv", "--policy-opt", "observation=8", "--out", str(out))
    assert changed.returncode == 2 and "policy.options.observation" in changed.stderr, changed.stderr
    assert (out / "samples.jsonl").read_text() == before


@pytest.mark.slow
def test_sweep_grid_runs_a_policy_with_options(tmp_path, smollm):
    from dynts.experiments.sweep import SweepSpec, load_cells, run_sweep

    spec = SweepSpec(
        model="smollm2-135m",
        policies=["streaming", "streaming:sinks=2"],
        budgets=[96],
        windows=[16],
        ratios=[0.5],
        datasets=["demo"],
        samples=1,
        limit=1,
        sampling=SamplingConfig(greedy=True, max_new_tokens=8),
        trace_steps=False,
        device="cpu",
    )
    result = run_sweep(spec, tmp_path / "sweep", loaded=smollm, progress=False)
    assert sorted(result.ran) == ["streaming+sinks=2-B96-W16-r0.5", "streaming-B96-W16-r0.5"]
    labels = sorted(cell.policy for cell in load_cells(tmp_path / "sweep"))
    assert labels == ["streaming", "streaming:sinks=2"]
    summary = (tmp_path / "sweep" / "summary.csv").read_text()
    assert "streaming:sinks=2" in summary
    grid = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["grid"]
    assert grid["policies"] == ["streaming", "streaming:sinks=2"]
    with pytest.raises(DynTSError, match="no policy of"):
        SweepSpec(
            model="smollm2-135m",
            policies=["window"],
            budgets=[96],
            windows=[16],
            ratios=[0.5],
            datasets=["demo"],
            policy_options={"sinks": "2"},
        ).cells()
