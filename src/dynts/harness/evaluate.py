"""`dynts eval`: benchmarks -> engine -> result store -> report.

Every sample is appended to OUT/samples.jsonl the moment it ends; a rerun skips what is stored. Each
sample's sampler is seeded from (seed, dataset, id, sample index), so a sample's text does not depend on
batching, on what was already done, on how many samples were asked for, or on where it was generated.

A run is: plan -> the pending work units (streams of samples not yet stored) -> an executor that yields each
sample as it ends -> this driver, which grades it and appends it to the store. The local executor runs the
units here; `dynts.runtime.ray_executor.RayExecutor` runs the same units on Ray workers (executor.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dynts import __version__
from dynts.engine.engine import Engine
from dynts.engine.requests import Request
from dynts.errors import DynTSError
from dynts.harness.datasets import Problem, load_dataset
from dynts.harness.prompts import DEFAULT_SHUFFLE_SEED, question_text
from dynts.harness.records import build_record
from dynts.harness.report import write_report
from dynts.harness.store import Key, ResultStore
from dynts.models.importance_head import head_digest
from dynts.policies.options import as_dict
from dynts.runtime.executor import EngineSpec, LocalExecutor, Task


def sample_seed(seed: int, problem: Problem, sample: int) -> int:
    return zlib.crc32(f"{seed}:{problem.dataset}:{problem.id}:{sample}".encode())


@dataclass
class EvalPlan:
    datasets: list[str]
    samples: int = 5
    limit: int | None = None
    data_dir: str | None = None
    split: str | None = None
    shuffle_seed: int = DEFAULT_SHUFFLE_SEED

    def __post_init__(self):
        if self.samples < 1:
            raise DynTSError(f"--samples must be at least 1, got {self.samples}")
        if self.limit is not None and self.limit < 1:
            raise DynTSError(f"--limit must be at least 1, got {self.limit}")
        if not self.datasets:
            raise DynTSError("--datasets names no dataset")

    def load(self) -> list[Problem]:
        problems: list[Problem] = []
        for name in self.datasets:
            problems += load_dataset(name, data_dir=self.data_dir, limit=self.limit, split=self.split)
        return problems


def manifest_for(spec: EngineSpec, engine: Engine, plan: EvalPlan) -> dict:
    """What defines the results of a run; a resume must match it (see store.py for the fields that may differ).

    The settings come from the spec and the plan; the engine built from the spec adds only what it resolved: the
    policy's full options and frame, the head it loaded, the model's dtype and device, and its random stream."""
    policy = engine.policy
    head = getattr(policy, "head", None)
    head_info = None
    if head is not None:
        head_info = {
            "hidden": list(head.config.layers),
            "base_model": head.config.base_model,
            "digest": head_digest(head),
        }
    budget = engine.budget
    return {
        "model": engine.loaded.name,
        "policy": {
            "name": policy.name,
            "registry_name": spec.policy,
            "budget": budget.budget,
            "window": budget.window if budget.compresses else None,
            "ratio": budget.ratio if budget.compresses else None,
            "options": as_dict(policy.config),
        },
        "head": head_info,
        "sampling": spec.sampling.to_dict(),
        "seed": spec.sampling.seed,
        "shuffle_seed": plan.shuffle_seed,
        "dtype": str(engine.loaded.dtype).replace("torch.", ""),
        "datasets": plan.datasets,
        "split": plan.split,
        "samples": plan.samples,
        "limit": plan.limit,
        "data_dir": str(Path(plan.data_dir).resolve()) if plan.data_dir else None,
        "data_source": "local" if plan.data_dir else "env-or-hub",
        "batch_size": spec.batch_size,
        "device": str(engine.device),
        "sampler": "argmax" if spec.sampling.greedy else engine.random_stream,
        "package_version": __version__,
    }


@dataclass
class EvalJob:
    """One run directory to fill: an engine configuration, the problems and samples, and where to store them."""

    engine: EngineSpec
    plan: EvalPlan
    out_dir: Path
    extra_manifest: dict | None = None


def prepare_runs(host, jobs: list[tuple[EngineSpec, EvalPlan, list[Problem]]]) -> tuple[list[dict], list[dict]]:
    """Task: per job, the manifest and the encoded prompts; raises when a prompt does not fit a job's budget.

    Runs wherever the model is (this process, or a worker), so the driver never needs a model of its own."""
    encoded: dict = {}
    manifests, prompts = [], []
    for spec, plan, problems in jobs:
        engine = host.engine(spec)
        ids = {}
        for p in problems:
            key = (p.dataset, p.id, plan.shuffle_seed)
            if key not in encoded:
                encoded[key] = engine.encode(question_text(p, plan.shuffle_seed))
            ids[p.dataset, p.id] = encoded[key]
        engine.check_prompts(list(ids.values()))  # bad budgets fail before anything is written
        manifests.append(manifest_for(spec, engine, plan))
        prompts.append(ids)
    return manifests, prompts


def sample_request(problem: Problem, sample: int, prompt_ids, seed: int) -> Request:
    """One sample from plan to record, as the engine's Request: its key is the store's record_key (dataset, id,
    sample index), with its prompt and its own sampler seed. Frozen and hashable, so a worker needs nothing else
    and a streaming task can name what came back; the driver finds the problem by the key."""
    key: Key = (problem.dataset, problem.id, sample)
    return Request(tuple(prompt_ids), sample_seed(seed, problem, sample), key=key)


def generate_stream(host, spec: EngineSpec, items: tuple[Request, ...]):
    """Streaming task: decode the samples with continuous batching, yielding (request, result) as each ends."""
    engine = host.engine(spec)
    try:
        for request, result in engine.stream(items):
            yield request, {"text": result.text, "token_ids": result.token_ids, "stats": result.stats.to_dict()}
    finally:
        engine.last_cache = None  # a cached engine must not pin the KV memory of its last stream


def split_units(items: list, parallelism: int, batch_size: int) -> list[list]:
    """One unit for a single executor (every row stays busy until the work runs out); else about two per worker,
    each big enough to fill the rows, so workers share the tail."""
    if parallelism <= 1 or len(items) <= batch_size:
        return [items] if items else []
    size = max(batch_size, -(-len(items) // (2 * parallelism)))
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_eval(
    engine: Engine | EngineSpec,
    plan: EvalPlan,
    out_dir: str | Path,
    progress: bool = True,
    extra_manifest: dict | None = None,
    executor=None,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) an evaluation into out_dir and return the metrics.

    engine: a built Engine (runs here), or an EngineSpec run by executor (e.g. dynts.runtime.ray_executor.RayExecutor).
    on_record(record) is called after each sample is stored."""
    if not isinstance(engine, EngineSpec):
        if executor is not None:
            raise DynTSError("run_eval takes an executor with an EngineSpec, not with a built Engine")
        spec = EngineSpec.of(engine)
        executor = LocalExecutor(engine.loaded, engines={spec: engine})
        engine = spec
    if executor is None:
        raise DynTSError("run_eval with an EngineSpec needs an executor")
    job = EvalJob(engine, plan, Path(out_dir), extra_manifest)
    return run_evals([job], executor, progress=progress, on_record=on_record)[0]


def run_evals(
    jobs: list[EvalJob],
    executor,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
    on_done: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Run (or resume) several evaluations through one executor; returns each job's metrics.

    Plan -> pending work units (the samples not yet stored; one stream per job here, about two per worker on
    Ray) -> the executor yields each sample the moment it ends, in any order -> this driver grades it and appends
    it to its job's store (written and fsynced at once, so a kill loses only sequences in flight). A sample
    already stored is never written twice. on_done(job index, metrics) is called when a job's last sample is
    stored (its report is written by then)."""
    problems: list[list[Problem]] = []
    by_plan: dict[int, list[Problem]] = {}
    for job in jobs:  # a sweep's jobs share one plan: its datasets load once
        if id(job.plan) not in by_plan:
            by_plan[id(job.plan)] = job.plan.load()
        problems.append(by_plan[id(job.plan)])
    manifests, prompt_ids = executor.call(prepare_runs, [(job.engine, job.plan, ps) for job, ps in zip(jobs, problems)])
    stores: list[ResultStore] = []
    metrics: list[dict | None] = [None] * len(jobs)
    try:
        for job, manifest in zip(jobs, manifests):
            stores.append(ResultStore(job.out_dir, {**manifest, **(job.extra_manifest or {})}))
        tasks, remaining, total, finished, correct = [], [0] * len(jobs), 0, 0, 0
        work: dict[tuple, Request] = {}
        problem_of = [{(p.dataset, p.id): p for p in ps} for ps in problems]
        parallelism = getattr(executor, "parallelism", 1)
        for j, (job, store) in enumerate(zip(jobs, stores)):
            done = store.done_keys()
            wanted = {(p.dataset, p.id, s) for p in problems[j] for s in range(job.plan.samples)}
            stored = [r for r in store.summaries() if (r["dataset"], r["id"], r["sample"]) in wanted]
            total, finished = total + len(wanted), finished + len(stored)
            correct += sum(bool(r["correct"]) for r in stored)
            seed = job.engine.sampling.seed
            todo = [
                sample_request(p, s, prompt_ids[j][p.dataset, p.id], seed)
                for p in problems[j]
                for s in range(job.plan.samples)
                if (p.dataset, p.id, s) not in done
            ]
            for item in todo:
                work[(j, *item.key)] = item
            remaining[j] = len(todo)
            for unit in split_units(todo, parallelism, job.engine.batch_size):
                tasks.append(Task(generate_stream, (job.engine,), tag=j, items=tuple(unit)))

        def finish(j: int) -> None:
            stores[j].close()
            metrics[j] = write_report(jobs[j].out_dir, stores[j].summaries())
            if on_done is not None:
                on_done(j, metrics[j])

        for j in range(len(jobs)):
            if not remaining[j]:
                finish(j)
        bar = tqdm(
            total=total, initial=finished, unit="sample", desc="eval", disable=not progress or None, dynamic_ncols=True
        )
        live = {"tokens": 0, "time": 0.0}
        for task, (sample, result) in executor.run(tasks):
            j = task.tag
            item = work.pop((j, *sample.key), None)
            if item is None:
                continue  # delivered twice (a worker died after sending it): stored already
            dataset, problem_id, index = item.key
            record = build_record(
                problem_of[j][dataset, problem_id],
                index,
                result["text"],
                result["stats"],
                shuffle_seed=jobs[j].plan.shuffle_seed,
            )
            record["token_ids"] = result["token_ids"]
            record["prompt_ids"] = list(item.prompt_ids)
            if stores[j].append(record):
                correct += bool(record["correct"])
                live["tokens"] += result["stats"]["generated_tokens"]
                live["time"] += result["stats"]["time_share_s"]
                bar.update(1)
                tps = live["tokens"] / live["time"] if live["time"] else 0.0
                bar.set_postfix(acc=f"{correct / max(bar.n, 1):.3f}", tps=f"{tps:.1f}")
                if on_record is not None:
                    on_record(record)
            remaining[j] -= 1
            if not remaining[j]:
                finish(j)
        bar.close()
    finally:
        for store in stores:
            store.close()
    return metrics
