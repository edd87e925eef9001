"""Running a sweep: check every cell before anything is written, evaluate the unfinished cells through one
executor, then decode each cell's probe for its step trace.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from dynts.config import SamplingConfig
from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.experiments.sweep.grid import Cell, SweepSpec, cell_dir
from dynts.experiments.sweep.manifest import _check_sweep_file, _write_sweep_file, read_sweep_file
from dynts.experiments.sweep.results import PROBE_FILE, STEPS_FILE, cell_is_complete, write_summary
from dynts.harness.datasets import load_dataset
from dynts.harness.evaluate import EvalJob, EvalPlan, run_evals
from dynts.harness.prompts import question_text
from dynts.harness.store import (
    write_json_atomic,
    write_text_atomic,
)
from dynts.models.importance_head import shipped_head_path
from dynts.models.loading import load_model
from dynts.policies import make_policy, policy_class
from dynts.runtime.executor import EngineSpec, LocalExecutor, Task


@dataclass
class SweepResult:
    out: Path
    cells: list[Cell]
    ran: list[str]
    skipped_done: list[str]
    skipped_invalid: list[str]
    summary: Path


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    loaded=None,
    load: Callable | None = None,
    progress: bool = True,
    make_executor: Callable | None = None,
) -> SweepResult:
    """Run (or resume, or extend) a sweep into out_dir.

    Where the cells run: make_executor() (e.g. a runtime.ray_executor.RayExecutor, whose workers share the units of
    every cell; closed at the end), else this process on `loaded` (tests, notebooks), else on `load()` (default:
    dynts.models.load_model with the spec's model/device/dtype). Each is called only when some cell still has
    work to do.
    """
    out = Path(out_dir)
    cells = spec.cells()  # grid mistakes: before anything else
    stored = read_sweep_file(out)
    shared = spec.shared(cells, stored["shared"] if stored else None)
    _check_sweep_file(out, stored, shared)
    if any(policy_class(c.policy).uses_head for c in cells) and spec.head is None:
        if shipped_head_path(spec.model) is None:
            uses = sorted({c.policy for c in cells if policy_class(c.policy).uses_head})
            raise DynTSError(
                f"policy {', '.join(uses)} needs "
                f"an importance head and none ships for model {spec.model!r}: pass --head PATH or "
                "leave the dynts policies out of --policies"
            )
    if spec.head is not None and not Path(spec.head).exists():
        raise DynTSError(f"--head {spec.head} does not exist")

    plan = EvalPlan(
        datasets=list(spec.datasets),
        samples=spec.samples,
        limit=spec.limit,
        data_dir=spec.data_dir,
        split=spec.split,
        shuffle_seed=spec.shuffle_seed,
    )
    problems = plan.load()  # unknown datasets and missing files fail here
    expected: dict[str, int] = {}
    for problem in problems:
        expected[problem.dataset] = expected.get(problem.dataset, 0) + 1
    for name in spec.datasets:
        if expected.get(name, 0) == 0:
            raise DynTSError(f"dataset {name!r} has no problems")

    probe_problem = _probe_problem(spec, stored["shared"] if stored else None, problems)
    if spec.trace_steps:
        shared["probe_prompt"] = {"dataset": probe_problem.dataset, "id": probe_problem.id}
    done = [c for c in cells if cell_is_complete(cell_dir(out, c), expected, spec.samples, spec.trace_steps)]
    todo = [c for c in cells if c not in done]
    executor, owned = None, False
    try:
        prompt_ids: dict = {}
        if todo:
            if make_executor is not None:
                executor, owned = make_executor(), True
            else:
                executor = LocalExecutor(loaded if loaded is not None else (load or _default_loader(spec))())
            prompt_ids, unfit = _validate_against_model(spec, todo, executor, [*problems, probe_problem])
            todo = [c for c in todo if c not in unfit]
            cells = [c for c in cells if c in done or c in todo]
        out.mkdir(parents=True, exist_ok=True)
        _write_sweep_file(out, stored, spec, shared, cells)

        # Every unfinished cell's samples go through the executor together, then the probes.
        jobs = [
            EvalJob(
                _engine_spec(spec, cell, spec.sampling, spec.batch_size),
                plan,
                cell_dir(out, cell),
                {"sweep_cell": cell.name},
            )
            for cell in todo
            if not cell_is_complete(cell_dir(out, cell), expected, spec.samples, need_steps=False)
        ]
        if jobs:
            run_evals(jobs, executor, progress=progress, on_done=lambda j, metrics: write_summary(out))
        probes = [cell for cell in todo if spec.trace_steps and not (cell_dir(out, cell) / STEPS_FILE).is_file()]
        if probes:
            prompt = prompt_ids[probe_problem.dataset, probe_problem.id]
            sampling = replace(spec.sampling, max_new_tokens=shared["probe_tokens"], ignore_eos=True)
            batch = shared["probe_batch"]
            tasks = [
                Task(probe_unit, (_engine_spec(spec, cell, sampling, batch, trace_steps=True), prompt), tag=cell)
                for cell in probes
            ]
            bar = tqdm(total=len(tasks), unit="cell", desc="probe", disable=not progress or None, dynamic_ncols=True)
            for task, result in executor.run(tasks):
                write_probe(task.tag, result, cell_dir(out, task.tag), prompt_ref=shared["probe_prompt"])
                write_summary(out)
                bar.update(1)
            bar.close()
    finally:
        if owned:
            executor.close()
    summary = write_summary(out)
    return SweepResult(out, cells, [c.name for c in todo], [c.name for c in done], list(spec.skipped), summary)


def _probe_problem(spec: SweepSpec, stored: dict | None, problems):
    """The probe decodes the first problem of the first dataset of the sweep's first run, in every cell."""
    ref = (stored or {}).get("probe_prompt")
    if not isinstance(ref, dict):
        return problems[0]
    for problem in problems:
        if (problem.dataset, problem.id) == (ref.get("dataset"), ref.get("id")):
            return problem
    for problem in load_dataset(ref["dataset"], data_dir=spec.data_dir, split=spec.split):
        if problem.id == ref.get("id"):
            return problem
    raise DynTSError(f"the sweep's probe problem {ref.get('dataset')}/{ref.get('id')} is no longer in its dataset")


def _default_loader(spec: SweepSpec) -> Callable:
    def load():
        return load_model(spec.model, device=spec.device, dtype=spec.dtype)

    return load


def check_cells(host, spec: SweepSpec, cells: list[Cell], problems) -> tuple[dict, list[str], list[Cell], int]:
    """Task: checks that need the tokenizer or the head: every prompt must fit every remaining cell.

    Returns the encoded prompts, the invalid cells' messages, the cells those are, and the longest prompt."""
    head = host.head(spec.head) if any(policy_class(c.policy).uses_head for c in cells) else None
    encoder = Engine(host.loaded, "full", None, spec.sampling, 1)
    prompt_ids = {(p.dataset, p.id): encoder.encode(question_text(p, spec.shuffle_seed)) for p in problems}
    longest = max(len(ids) for ids in prompt_ids.values())
    invalid, unfit = [], []
    for cell in cells:
        if not cell.compresses:
            continue
        budget = cell.budget_config()
        policy = make_policy(
            cell.policy, budget, dict(cell.options), head=head, head_path=spec.head, seed=spec.sampling.seed
        )
        try:  # the longest prompt is the binding one for both constraints (prompt + W < B, prompt <= r(B-W))
            budget.check_prompt(longest, policy.protects_prompt)
        except DynTSError as exc:
            invalid.append(f"{cell.name}: {exc}")
            unfit.append(cell)
    return prompt_ids, invalid, unfit, longest


def _validate_against_model(spec: SweepSpec, cells: list[Cell], model, problems) -> tuple[dict, set]:
    """check_cells on a loaded model or through an executor; invalid cells fail (or are skipped, with
    --skip-invalid). Returns the encoded prompts and the cells left out."""
    executor = model if hasattr(model, "run") else LocalExecutor(model)
    prompt_ids, invalid, unfit, longest = executor.call(check_cells, spec, cells, problems)
    spec._report_invalid(invalid, f"for the prompts of {', '.join(spec.datasets)} (longest: {longest} tokens)")
    return prompt_ids, set(unfit)


def _engine_spec(spec: SweepSpec, cell: Cell, sampling: SamplingConfig, batch_size: int, trace_steps: bool = False):
    return EngineSpec(
        cell.policy,
        cell.budget_config(),
        sampling,
        batch_size,
        head_path=spec.head,
        trace_steps=trace_steps,
        fast=spec.fast,
        policy_options=cell.options,
        batching=spec.batching,
        kernel=spec.kernel,
        graphs=spec.graphs,
        compile=spec.compile,
    )


def probe_unit(host, engine_spec, prompt: list[int]) -> dict:
    """Task: decode the probe prompt batch_size times for max_new_tokens tokens (EOS ignored), tracing steps."""
    engine = host.engine(engine_spec)
    batch, sampling = engine_spec.batch_size, engine_spec.sampling
    try:
        output = engine.generate([prompt] * batch, seeds=[sampling.seed + i for i in range(batch)])
    finally:
        engine.last_cache = None
    stats = output.stats.to_dict()
    steps = stats.pop("steps", [])
    return {
        "steps": steps,
        "stats": stats,
        "device": str(engine.device),
        "prompt_tokens": len(prompt),
        "sampling": sampling.to_dict(),
        "batch": batch,
    }


def write_probe(cell: Cell, result: dict, directory: Path, prompt_ref: dict | None = None) -> Path:
    """Write a probe's steps.jsonl and probe.json into the cell directory."""
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / STEPS_FILE, steps_jsonl(result["steps"]))
    probe = {
        "cell": cell.name,
        "policy": cell.label,
        "budget": cell.budget,
        "window": cell.window,
        "ratio": cell.ratio,
        "prompt": prompt_ref,
        "prompt_tokens": result["prompt_tokens"],
        "tokens": result["sampling"]["max_new_tokens"],
        "batch": result["batch"],
        "sampling": result["sampling"],
        "device": result["device"],
        "stats": result["stats"],
    }
    write_json_atomic(directory / PROBE_FILE, probe)
    return directory / STEPS_FILE


def steps_jsonl(steps: list[dict]) -> str:
    """One line per decode step per batch; `batch` counts the engine's batches (its step counter restarts)."""
    lines = []
    batch = -1
    for entry in steps:
        if entry.get("step") == 0:
            batch += 1
        line = {"batch": max(batch, 0), **entry, "compressed": len(entry.get("compressed") or [])}
        lines.append(json.dumps(line))
    return "".join(line + "\n" for line in lines)
