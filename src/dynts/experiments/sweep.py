"""`dynts sweep`: run a policy x budget x window x ratio grid through the evaluation harness.

Layout of a sweep directory::

    SWEEP/sweep.json              the shared flags (model, sampling, samples, ...) and the union of all grids run
    SWEEP/summary.csv             one row per cell and dataset (rewritten after every cell)
    SWEEP/cells/<cell>/           one `dynts eval` run directory per cell: run.json, samples.jsonl,
                                  metrics.json, report.md, and with step tracing steps.jsonl + probe.json

Cells are named `full` (FullKV runs once: it does not depend on the budget) and `<policy>-B<b>-W<w>-r<r>`.

Why it works this way:

* Everything that can be wrong with a grid (unknown policy, W >= B, a ratio that frees nothing, a prompt
  that does not fit a budget, a dynts policy without an importance head, shared flags that differ from the
  ones stored in sweep.json) is found before the first cell runs and before anything is written.
* Resuming: a cell whose metrics.json covers every requested dataset completely (every problem, with the
  requested number of samples) and that holds its step trace (when asked for) is skipped without loading
  the model; a half-finished cell is resumed by run_evals, which skips the samples it already stored.
* The samples of every unfinished cell go through one executor together (one pool of workers with --ray, see
  runtime/ray_executor.py), then the probes; each cell's metrics.json and the summary are written as it completes.
* Rerunning with a different grid into the same SWEEP extends it (sweep.json keeps the union); the flags
  that change per-sample results (model, dtype, sampling, samples, limit, data, head, probe length) must
  match, so every cell of one sweep is comparable.
* Step traces come from a fixed *probe*: after the cells' evaluations, each cell's engine settings decode the
  first problem of the first dataset for a fixed number of tokens, ignoring EOS. The TPS-vs-step and
  KV-vs-step curves then compare policies on one identical workload (same prompt, same length, same batch
  composition at every step), which the evaluation itself cannot give: there, sequences stop at different
  lengths (so `active` and the KV size change for reasons other than the policy) and a resumed cell would
  only trace what was left to do.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.harness.datasets import load_dataset
from dynts.harness.evaluate import EvalJob, EvalPlan, run_evals
from dynts.harness.prompts import DEFAULT_SHUFFLE_SEED, question_text
from dynts.harness.report import METRICS_FILE
from dynts.harness.store import MANIFEST_FILE, read_manifest, write_json_atomic, write_text_atomic
from dynts.models.importance_head import shipped_head_path
from dynts.models.loading import load_model
from dynts.policies import budget_for, make_policy, policy_class, policy_config
from dynts.policies.options import as_dict, format_spec, parse_spec
from dynts.policies.registry import check_common_options, resolve_spec
from dynts.runtime.executor import EngineSpec, LocalExecutor, Task

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.csv"
CELLS_DIR = "cells"
STEPS_FILE = "steps.jsonl"
PROBE_FILE = "probe.json"
SWEEP_FORMAT = 1

SUMMARY_COLUMNS = (
    "model",
    "policy",
    "budget",
    "window",
    "ratio",
    "dataset",
    "pass@1",
    "pass@k",
    "k",
    "maj@k",
    "tps",
    "tps_forward",
    "peak_kv_tokens",
    "peak_kv_bytes",
    "mean_generated_tokens",
    "n_problems",
    "samples_per_problem",
    "complete",
    "cell",
    # added later, so the columns above keep their positions
    "pass@1_lo",
    "pass@1_hi",
    "median_generated_tokens",
    "p90_generated_tokens",
    "truncation_rate",
)

# Shared flags whose change would make cells of one sweep incomparable: a rerun must match them.
STRICT_FIELDS = ("model", "dtype", "sampling", "samples", "limit", "data_dir", "split", "shuffle_seed", "head")
# The probe's shape must match too, once both runs traced steps (tracing itself may be switched on or off).
PROBE_FIELDS = ("probe_tokens", "probe_batch")


# --------------------------------------------------------------------------- #
# Grid syntax
# --------------------------------------------------------------------------- #


def parse_int_list(text: str, flag: str = "--budgets") -> list[int]:
    """'2500:5000:500' (inclusive), '2500,3000', or a mix: '2500:3500:500,5000'. Sorted, without duplicates."""
    values = _parse_list(text, flag, int, "integers")
    return sorted(set(values))


def parse_float_list(text: str, flag: str = "--ratios") -> list[float]:
    """Like parse_int_list for floats: '0.3,0.4' or '0.2:0.5:0.1' (inclusive, rounded to 10 decimals)."""
    values = _parse_list(text, flag, float, "numbers")
    return sorted(set(values))


def _parse_list(text, flag, kind, noun):
    usage = f"{flag} takes comma-separated {noun} and/or inclusive ranges start:stop:step, got {text!r}"
    if not isinstance(text, str) or not text.strip():
        raise DynTSError(f"{flag} is empty; it takes comma-separated {noun} and/or ranges start:stop:step")
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise DynTSError(usage)
        pieces = part.split(":")
        try:
            numbers = [kind(p.strip()) for p in pieces]
        except ValueError:
            raise DynTSError(usage) from None
        if any(isinstance(n, float) and not math.isfinite(n) for n in numbers):
            raise DynTSError(usage)
        if len(numbers) == 1:
            values.append(numbers[0])
            continue
        if len(numbers) != 3:
            raise DynTSError(f"{flag}: range {part!r} must be start:stop:step (all three parts), e.g. 2500:5000:500")
        start, stop, step = numbers
        if step <= 0:
            raise DynTSError(f"{flag}: range {part!r} needs a positive step")
        if stop < start:
            raise DynTSError(f"{flag}: range {part!r} has stop < start")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        if count > 1000:
            raise DynTSError(f"{flag}: range {part!r} expands to {count} values; that is not a sensible grid")
        for i in range(count):
            value = start + i * step
            values.append(round(value, 10) if kind is float else value)
    return values


def parse_names(text: str, flag: str) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise DynTSError(f"{flag} names nothing")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- #
# Cells and the sweep specification
# --------------------------------------------------------------------------- #


def format_ratio(ratio: float) -> str:
    return f"{ratio:.10g}"


@dataclass(frozen=True)
class Cell:
    """One evaluation of the grid: a policy with its options and, for compressing policies, its B / W / r."""

    policy: str
    budget: int | None = None
    window: int | None = None
    ratio: float | None = None
    options: tuple[tuple[str, Any], ...] = ()  # the policy options that differ from its defaults, sorted

    @property
    def compresses(self) -> bool:
        return self.budget is not None

    @property
    def label(self) -> str:
        """The policy and its non-default options, as written in --policies: NAME or NAME:KEY=VALUE..."""
        return format_spec(self.policy, dict(self.options))

    @property
    def name(self) -> str:
        """The cell's directory name: NAME[+KEY=VALUE...][-B<b>-W<w>-r<r>]."""
        head = "+".join([self.policy, *(f"{k}={v}" for k, v in parse_spec(self.label)[1].items())])
        if not self.compresses:
            return head
        return f"{head}-B{self.budget}-W{self.window}-r{format_ratio(self.ratio)}"

    def budget_config(self) -> BudgetConfig:
        return budget_for(self.policy, self.budget, self.window, self.ratio)


@dataclass
class SweepSpec:
    """Everything `dynts sweep` needs. cells() finds the grid's mistakes; run_sweep checks the rest (datasets,
    prompts against budgets, the importance head, sweep.json) before anything is written."""

    model: str
    policies: list[str]  # NAME or NAME:KEY=VALUE... (policy options)
    budgets: list[int]
    windows: list[int]
    ratios: list[float]
    datasets: list[str]
    samples: int = 1
    limit: int | None = None
    data_dir: str | None = None
    split: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    head: str | None = None
    trace_steps: bool = True
    probe_tokens: int | None = None  # None: min(max_new_tokens, 2 x the largest budget)
    probe_batch: int | None = None  # None: 1
    skip_invalid: bool = False
    fast: bool | None = None  # the static fast decode path; None: on with CUDA
    batching: str = "continuous"
    kernel: str | None = None
    graphs: bool | None = None
    compile: bool | None = None
    shuffle_seed: int | None = None
    policy_options: dict[str, Any] = field(default_factory=dict)  # --policy-opt: for every policy that has the key
    skipped: list[str] = field(default_factory=list)  # invalid cells dropped by skip_invalid

    def __post_init__(self):
        if self.shuffle_seed is None:
            self.shuffle_seed = DEFAULT_SHUFFLE_SEED
        EvalPlan(datasets=list(self.datasets), samples=self.samples, limit=self.limit)  # same checks as eval
        if self.batch_size < 1:
            raise DynTSError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.probe_tokens is not None and self.probe_tokens < 1:
            raise DynTSError(f"--probe-tokens must be at least 1, got {self.probe_tokens}")
        if self.probe_batch is not None and self.probe_batch < 1:
            raise DynTSError(f"--probe-batch must be at least 1, got {self.probe_batch}")
        if not self.policies:
            raise DynTSError("--policies names no policy")

    # -- grid ----------------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        """The cells of the grid; raises one DynTSError naming every invalid cell (unless skip_invalid)."""
        self.skipped = []
        cells: list[Cell] = []
        invalid: list[str] = []
        entries = [resolve_spec(text, self.policy_options) for text in self.policies]
        check_common_options(self.policy_options, [name for name, _ in entries])
        for policy, options in dict.fromkeys(entries):
            if not policy_class(policy).compresses:
                cells.append(Cell(policy, options=options))
                continue
            if not self.budgets or not self.windows or not self.ratios:
                raise DynTSError(f"policy {policy} compresses: give --budgets, --windows and --ratios")
            for budget in self.budgets:
                for window in self.windows:
                    for ratio in self.ratios:
                        cell = Cell(policy, int(budget), int(window), float(ratio), options)
                        try:
                            cell.budget_config()
                        except DynTSError as exc:
                            invalid.append(f"{cell.name}: {exc}")
                            continue
                        cells.append(cell)
        self._report_invalid(invalid, "in the grid")
        if not cells:
            raise DynTSError("the grid has no valid cell")
        return cells

    def _report_invalid(self, invalid: list[str], where: str) -> None:
        if not invalid:
            return
        if self.skip_invalid:
            self.skipped += invalid
            return
        shown = "\n  ".join(invalid[:20]) + (f"\n  ... and {len(invalid) - 20} more" if len(invalid) > 20 else "")
        raise DynTSError(
            f"{len(invalid)} invalid cell(s) {where}:\n  {shown}\n"
            "change --budgets/--windows/--ratios, or pass --skip-invalid to leave these cells out"
        )

    def resolved_probe_tokens(self, cells: list[Cell], stored: dict | None = None) -> int:
        """--probe-tokens, else what the sweep used before, else min(max_new_tokens, 2 x the largest budget)."""
        if self.probe_tokens is not None:
            return self.probe_tokens
        if stored and stored.get("probe_tokens"):
            return int(stored["probe_tokens"])
        budgets = [c.budget for c in cells if c.compresses]
        wanted = 2 * max(budgets) if budgets else self.sampling.max_new_tokens
        return min(self.sampling.max_new_tokens, wanted)

    def shared(self, cells: list[Cell], stored: dict | None = None) -> dict:
        """The flags every cell of the sweep shares (compared on a rerun) and a few informative ones.

        stored: the shared flags of an existing sweep.json, whose probe settings fill in the ones not given."""
        probe_batch = self.probe_batch or (stored or {}).get("probe_batch") or 1
        return {
            "model": self.model,
            "dtype": self.dtype,
            "sampling": self.sampling.to_dict(),
            "samples": self.samples,
            "limit": self.limit,
            "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None,
            "split": self.split,
            "shuffle_seed": self.shuffle_seed,
            "head": str(Path(self.head).resolve()) if self.head else None,
            "trace_steps": self.trace_steps,
            "probe_tokens": self.resolved_probe_tokens(cells, stored) if self.trace_steps else None,
            "probe_batch": probe_batch if self.trace_steps else None,
            "batch_size": self.batch_size,
            "device": self.device,
        }

    def grid(self) -> dict:
        labels = [
            format_spec(name, dict(options))
            for name, options in (resolve_spec(text, self.policy_options) for text in self.policies)
        ]
        return {
            "policies": list(dict.fromkeys(labels)),
            "budgets": list(self.budgets),
            "windows": list(self.windows),
            "ratios": list(self.ratios),
            "datasets": list(self.datasets),
        }


# --------------------------------------------------------------------------- #
# sweep.json
# --------------------------------------------------------------------------- #


def read_sweep_file(sweep_dir: str | Path) -> dict | None:
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DynTSError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("shared"), dict):
        raise DynTSError(f"{path} is not a dynts sweep file")
    return data


def shared_differences(stored: dict, new: dict) -> list[str]:
    out = []
    for key in STRICT_FIELDS:
        old_value, new_value = stored.get(key), new.get(key)
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            for sub in sorted(old_value.keys() | new_value.keys()):
                if old_value.get(sub) != new_value.get(sub):
                    out.append(f"{key}.{sub}: stored {old_value.get(sub)!r}, now {new_value.get(sub)!r}")
        elif old_value != new_value:
            out.append(f"{key}: stored {old_value!r}, now {new_value!r}")
    for key in PROBE_FIELDS:
        old_value, new_value = stored.get(key), new.get(key)
        if old_value is not None and new_value is not None and old_value != new_value:
            out.append(f"{key}: stored {old_value!r}, now {new_value!r} (step traces of one sweep must be comparable)")
    return out


def _check_sweep_file(out: Path, stored: dict | None, shared: dict) -> None:
    if stored is None:
        if (out / CELLS_DIR).exists():
            raise DynTSError(f"{out} holds cells but no {SWEEP_FILE}; use a new --out directory")
        return
    differences = shared_differences(stored["shared"], shared)
    if differences:
        raise DynTSError(
            f"{out / SWEEP_FILE} was written with different shared flags ({'; '.join(differences)}). "
            "A rerun into the same sweep may change the grid (policies, budgets, windows, ratios, datasets) "
            "but not these; use the same flags or a new --out directory."
        )


def _write_sweep_file(out: Path, stored: dict | None, spec: SweepSpec, shared: dict, cells: list[Cell]) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    union = dict(stored["grid"]) if stored else {}
    for key, values in spec.grid().items():
        merged = list(dict.fromkeys([*union.get(key, []), *values]))
        union[key] = sorted(merged) if key in ("budgets", "windows", "ratios") else merged
    data = {
        "format": SWEEP_FORMAT,
        "shared": {
            **(stored["shared"] if stored else {}),
            **{k: v for k, v in shared.items() if v is not None or k not in PROBE_FIELDS},
        },
        "grid": union,
        "cells": list(dict.fromkeys([*(stored.get("cells", []) if stored else []), *(c.name for c in cells)])),
        "runs": [
            *(stored.get("runs", []) if stored else []),
            {"at": now, "grid": spec.grid(), "skipped": list(spec.skipped)},
        ],
        "created_at": stored.get("created_at", now) if stored else now,
        "updated_at": now,
    }
    write_json_atomic(out / SWEEP_FILE, data)


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def cell_dir(sweep_dir: str | Path, cell: Cell) -> Path:
    return Path(sweep_dir) / CELLS_DIR / cell.name


def cell_is_complete(directory: Path, expected: dict[str, int], samples: int, need_steps: bool) -> bool:
    """True when metrics.json covers every expected dataset fully (and the step trace exists if needed)."""
    if need_steps and not (directory / STEPS_FILE).is_file():
        return False
    try:
        metrics = json.loads((directory / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    rows = metrics.get("datasets") if isinstance(metrics, dict) else None
    if not isinstance(rows, dict):
        return False
    for name, problems in expected.items():
        row = rows.get(name)
        if not isinstance(row, dict) or not row.get("complete"):
            return False
        if (row.get("n_problems") or 0) < problems or (row.get("samples_per_problem") or 0) < samples:
            return False
    return True


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

    Where the cells run: make_executor() (e.g. a dynts.distributed.RayExecutor, whose workers share the units of
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


# --------------------------------------------------------------------------- #
# Reading results back
# --------------------------------------------------------------------------- #


@dataclass
class CellResult:
    name: str
    directory: Path
    model: str
    policy: str  # the policy as run: NAME, or NAME:KEY=VALUE... for options that differ from its defaults
    budget: int | None
    window: int | None
    ratio: float | None
    metrics: dict
    manifest: dict

    @property
    def compresses(self) -> bool:
        return self.budget is not None

    def steps(self) -> list[dict] | None:
        return read_steps(self.directory)

    def probe(self) -> dict | None:
        path = self.directory / PROBE_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None


def read_steps(directory: Path) -> list[dict] | None:
    path = Path(directory) / STEPS_FILE
    if not path.is_file():
        return None
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                steps.append(json.loads(line))
            except ValueError:
                continue
    return steps


def load_cells(sweep_dir: str | Path) -> list[CellResult]:
    """Every finished (reported) cell of a sweep, read from its run.json and metrics.json."""
    root = Path(sweep_dir) / CELLS_DIR
    if not root.is_dir():
        return []
    results = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (directory / METRICS_FILE).is_file() or not (directory / MANIFEST_FILE).is_file():
            continue
        manifest = read_manifest(directory)
        try:
            metrics = json.loads((directory / METRICS_FILE).read_text(encoding="utf-8"))
        except ValueError:
            continue
        policy = manifest.get("policy") or {}
        budget = policy.get("budget")
        name = str(policy.get("registry_name") or policy.get("name"))
        results.append(
            CellResult(
                name=directory.name,
                directory=directory,
                model=str(manifest.get("model")),
                policy=_label(name, policy.get("options") or {}),
                budget=int(budget) if budget is not None else None,
                window=policy.get("window") if budget is not None else None,
                ratio=policy.get("ratio") if budget is not None else None,
                metrics=metrics,
                manifest=manifest,
            )
        )
    return results


def _label(policy: str, options: dict) -> str:
    """NAME:KEY=VALUE... for the options that differ from the policy's defaults (NAME for an unknown policy)."""
    try:
        default = as_dict(policy_config(policy))
    except DynTSError:
        return policy
    return format_spec(policy, {k: v for k, v in sorted(options.items()) if k in default and default[k] != v})


def summary_rows(cells: list[CellResult]) -> list[dict]:
    """One row per cell and dataset (SUMMARY_COLUMNS); pass@1_lo/hi: its 95% interval (empty for cells whose
    metrics.json predates intervals: `dynts report CELL` recomputes it)."""
    rows = []
    for cell in cells:
        for dataset, m in sorted(cell.metrics.get("datasets", {}).items()):
            ci = m.get("pass@1_ci") or (None, None)
            rows.append(
                {
                    "model": cell.model,
                    "policy": cell.policy,
                    "budget": cell.budget,
                    "window": cell.window,
                    "ratio": cell.ratio,
                    "dataset": dataset,
                    "pass@1": m.get("pass@1"),
                    "pass@k": m.get("pass@k"),
                    "k": m.get("k"),
                    "maj@k": m.get("maj@k"),
                    "tps": m.get("tps"),
                    "tps_forward": m.get("tps_forward"),
                    "peak_kv_tokens": m.get("peak_kv_tokens"),
                    "peak_kv_bytes": m.get("peak_kv_bytes"),
                    "mean_generated_tokens": m.get("mean_generated_tokens"),
                    "n_problems": m.get("n_problems"),
                    "samples_per_problem": m.get("samples_per_problem"),
                    "complete": m.get("complete"),
                    "cell": cell.name,
                    "pass@1_lo": ci[0],
                    "pass@1_hi": ci[1],
                    "median_generated_tokens": m.get("median_generated_tokens"),
                    "p90_generated_tokens": m.get("p90_generated_tokens"),
                    "truncation_rate": m.get("truncation_rate"),
                }
            )
    return rows


def write_csv(path: str | Path, columns, rows: list[dict]) -> Path:
    """A CSV with full float precision (repr round-trips); None becomes an empty field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    write_text_atomic(path, buffer.getvalue())
    return Path(path)


def write_summary(sweep_dir: str | Path) -> Path:
    return write_csv(Path(sweep_dir) / SUMMARY_FILE, SUMMARY_COLUMNS, summary_rows(load_cells(sweep_dir)))


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


__all__ = [
    "Cell",
    "CellResult",
    "SweepSpec",
    "SweepResult",
    "cell_is_complete",
    "load_cells",
    "parse_float_list",
    "parse_int_list",
    "parse_names",
    "probe_unit",
    "read_csv",
    "read_steps",
    "run_sweep",
    "summary_rows",
    "write_probe",
    "write_summary",
]
