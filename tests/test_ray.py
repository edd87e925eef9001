"""Scale-out on Ray (local instance, 2 workers, the embedded model): same results as a local run, resume across
local and Ray, a killed worker's units retried, and no Ray import without --ray.

The reference is a local `dynts eval` in a subprocess; everything on Ray shares one module-scoped Ray instance
and one pool of two workers (the CLI test starts its own pool inside that instance).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dynts.cli.main import main
from dynts.config import BudgetConfig, SamplingConfig
from dynts.errors import DynTSError
from dynts.harness.evaluate import EvalPlan, run_eval
from dynts.harness.store import manifest_differences, read_manifest, read_records
from dynts.runtime.executor import EngineSpec

# Greedy, window policy under a budget the second demo prompt (58 tokens; the first three: 51, 58, 46) reaches.
FLAGS = [
    "--model",
    "smollm2-135m",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--policy",
    "window",
    "--budget",
    "72",
    "--window",
    "8",
    "--ratio",
    "0.5",
    "--greedy",
    "--max-new-tokens",
    "16",
    "--batch-size",
    "1",
    "--datasets",
    "demo",
    "--samples",
    "2",
]
SPEC = EngineSpec("window", BudgetConfig(72, 8, 0.5), SamplingConfig(greedy=True, max_new_tokens=16), 1)
PLAN = EvalPlan(datasets=["demo"], samples=2, limit=3)


def eval_argv(out: Path, limit: int, *extra: str) -> list[str]:
    return ["eval", *FLAGS, "--limit", str(limit), "--out", str(out), *extra]


def by_key(out: Path) -> dict:
    """(dataset, id, sample) -> (verdict, extracted answer, token ids); fails on a key stored twice."""
    records = read_records(out)
    keys = [(r["dataset"], r["id"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)), "a sample was stored twice"
    return {k: (r["correct"], r["extracted"], r["token_ids"]) for k, r in zip(keys, records)}


# --------------------------------------------------------------------------- flags (no Ray needed)


def test_ray_flags_without_ray_are_one_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_argv(out, 1, "--workers", "2")) == 2
    assert capsys.readouterr().err.strip() == "dynts: error: --workers applies only with --ray"
    assert not out.exists()
    (tmp_path / "run.json").write_text('{"model": "smollm2-135m"}')
    assert main(["label", str(tmp_path), "--workers", "2", "--gpus-per-worker", "1"]) == 2
    assert capsys.readouterr().err.strip() == "dynts: error: --workers and --gpus-per-worker apply only with --ray"
    assert not (tmp_path / "labels").exists()


def test_ray_config_is_validated():
    from dynts.runtime.ray_executor import RayConfig

    assert RayConfig(workers=2).address == "local"
    for bad in ({"workers": 0}, {"workers": 1.5}, {"gpus_per_worker": -1}, {"address": " "}, {"cpus_per_worker": 0}):
        with pytest.raises(DynTSError):
            RayConfig(**bad)


def test_missing_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    out = tmp_path / "run"
    assert main(eval_argv(out, 1, "--ray")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynts: error:") and 'pip install "dynts[ray]"' in err[0]
    assert not out.exists()


# --------------------------------------------------------------------------- the local reference


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """A local run with --limit 1 (to be resumed on Ray) and a complete local run with --limit 3, in one
    subprocess that also reports whether anything imported Ray."""
    root = tmp_path_factory.mktemp("local")
    script = (
        "import sys, json\n"
        "from dynts.cli.main import main\n"
        f"assert main({eval_argv(root / 'partial', 1)!r}) == 0\n"
        f"assert main({eval_argv(root / 'full', 3)!r}) == 0\n"
        "print(json.dumps({'ray_imported': 'ray' in sys.modules}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "partial": root / "partial",
        "full": root / "full",
        "ray_imported": json.loads(done.stdout.strip().splitlines()[-1])["ray_imported"],
    }


def test_local_run_never_imports_ray(local_runs):
    assert local_runs["ray_imported"] is False


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    # 4 logical CPUs: the module's pool (2 workers) and the CLI test's own pool (2 more) fit side by side
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="error", ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(ray_instance):
    from dynts.runtime.ray_executor import ModelArgs, RayConfig, RayExecutor

    executor = RayExecutor(RayConfig(workers=2), ModelArgs("smollm2-135m", "cpu", "fp32"))
    yield executor
    executor.close()


def test_ray_eval_matches_local(tmp_path, local_runs, pool):
    out = tmp_path / "ray"
    run_eval(SPEC, PLAN, out, executor=pool, progress=False)
    reference = by_key(local_runs["full"])
    assert len(reference) == 6
    assert any(r["stats"]["compressions"] for r in read_records(out))  # the policy did evict
    assert by_key(out) == reference  # verdicts, answers and token ids (greedy)
    # the Ray flags are not part of the run: either run could resume the other
    assert manifest_differences(read_manifest(local_runs["full"]), read_manifest(out)) == []
    assert json.loads((out / "metrics.json").read_text())["datasets"]["demo"]["n_samples"] == 6
    assert {w["pid"] for w in pool.worker_info()} != {os.getpid()} and len(pool.worker_info()) == 2


def test_local_run_resumes_on_ray_via_cli(tmp_path, local_runs, ray_instance):
    out = tmp_path / "resumed"
    shutil.copytree(local_runs["partial"], out)
    before = read_records(out)
    assert len(before) == 2
    assert main(eval_argv(out, 3, "--ray", "--workers", "2")) == 0
    assert by_key(out) == by_key(local_runs["full"])
    assert read_records(out)[:2] == before  # what the local run stored stays as it was
    manifest = read_manifest(out)
    assert manifest["resumes"] == 1 and manifest["limit"] == 3


class Borrowed:
    """The module's pool, lent to run_sweep (which closes the executors it is given to make)."""

    def __init__(self, executor):
        self.call, self.run = executor.call, executor.run

    def close(self):
        pass


def test_ray_sweep_matches_local(tmp_path, smollm, pool):
    from dynts.experiments.sweep import SweepSpec, load_cells, read_steps, run_sweep

    spec = dict(
        model="smollm2-135m",
        policies=["full", "window"],
        budgets=[72],
        windows=[8],
        ratios=[0.5],
        datasets=["demo"],
        samples=1,
        limit=1,
        sampling=SamplingConfig(greedy=True, max_new_tokens=16),
        batch_size=2,
        probe_tokens=24,
        device="cpu",
        dtype="fp32",
    )
    local = run_sweep(SweepSpec(**spec), tmp_path / "local", loaded=smollm, progress=False)
    remote = run_sweep(SweepSpec(**spec), tmp_path / "ray", progress=False, make_executor=lambda: Borrowed(pool))
    assert sorted(remote.ran) == sorted(local.ran) == ["full", "window-B72-W8-r0.5"]
    for cell in load_cells(tmp_path / "ray"):
        assert by_key(cell.directory) == by_key(tmp_path / "local" / "cells" / cell.name)
        steps, reference = read_steps(cell.directory), read_steps(tmp_path / "local" / "cells" / cell.name)
        assert [(s["kv_tokens"], s["compressed"]) for s in steps] == [
            (s["kv_tokens"], s["compressed"]) for s in reference
        ]
    assert (tmp_path / "ray" / "summary.csv").read_text().count("\n") == 3


def test_ray_labels_match_local(tmp_path, smollm, local_runs, pool, monkeypatch):
    from safetensors import safe_open

    from dynts.predictor.labels import label_store

    monkeypatch.setattr(
        "dynts.predictor.labels.LABEL_UNIT", 2
    )  # three units for two workers: they may finish out of order

    for name in ("local", "ray"):
        shutil.copytree(local_runs["full"], tmp_path / name)
    local = label_store(smollm, tmp_path / "local", shard_size=2, progress=False)
    remote = label_store(None, tmp_path / "ray", shard_size=2, progress=False, executor=pool)
    assert remote == local and len(local["shards"]) > 1
    for shard in local["shards"]:
        with (
            safe_open(tmp_path / "local" / "labels" / shard, "pt") as a,
            safe_open(tmp_path / "ray" / "labels" / shard, "pt") as b,
        ):
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert a.get_tensor(key).equal(b.get_tensor(key)), key


class Counting:
    """An executor that notes every sample a streaming task hands back (to see what ran twice)."""

    def __init__(self, executor):
        self.executor, self.parallelism, self.delivered = executor, executor.parallelism, []

    def call(self, fn, *args):
        return self.executor.call(fn, *args)

    def run(self, tasks):
        for task, part in self.executor.run(tasks):
            if task.items is not None:
                self.delivered.append(part[0].key)
            yield task, part


def test_killed_worker_units_are_retried_and_stored_once(tmp_path, local_runs, pool):
    """Samples stream back one by one; a worker killed mid-unit has its undelivered samples redone elsewhere,
    and no sample that came back runs again."""
    out = tmp_path / "killed"
    killed = []
    counting = Counting(pool)

    def kill_a_busy_worker(record):
        if killed:
            return
        victim = max(pool.worker_info(), key=lambda w: w["inflight"])
        assert victim["inflight"] > 0
        os.kill(victim["pid"], signal.SIGKILL)
        killed.append(victim["pid"])

    restarts = pool.restarts
    run_eval(SPEC, PLAN, out, executor=counting, progress=False, on_record=kill_a_busy_worker)
    assert killed and pool.restarts == restarts + 1  # the dead worker was replaced once
    assert by_key(out) == by_key(local_runs["full"])  # every (problem, sample) exactly once, same tokens
    assert len(counting.delivered) == len(set(counting.delivered)) == 6  # nothing that came back ran again


def die(host):
    """A task that takes its worker down with it."""
    os._exit(1)


def test_workers_that_keep_dying_end_the_run_with_one_error(pool, ray_instance):
    """Last in the module: it leaves the pool with a dead worker."""
    from dataclasses import replace

    from ray import cloudpickle

    from dynts.runtime.executor import Task

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    pool.config = replace(pool.config, max_retries=0)  # the first death is one too many
    with pytest.raises(DynTSError, match="Ray workers keep dying"):
        list(pool.run([Task(die)]))
