"""A sweep's results read back: finished cells, their step traces, and SWEEP/summary.csv (a row per cell and
dataset).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from dynts.errors import DynTSError
from dynts.experiments.sweep.grid import CELLS_DIR
from dynts.harness.report import METRICS_FILE
from dynts.harness.store import (
    MANIFEST_FILE,
    read_manifest,
    write_text_atomic,
)
from dynts.policies import policy_config
from dynts.policies.options import as_dict, format_spec

SUMMARY_FILE = "summary.csv"


STEPS_FILE = "steps.jsonl"


PROBE_FILE = "probe.json"


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
