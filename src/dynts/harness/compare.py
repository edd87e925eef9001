"""`dynts compare`: runs side by side on the samples they share, each against the first (the baseline).

What is compared, per dataset and for the mean over datasets (the mean as in metrics.json: unweighted over
datasets):

* Pass@1 with its interval (uncertainty.py), and the difference to the baseline: the mean over problems of the
  per-problem difference of mean accuracy, with a paired bootstrap interval (one draw of problems for both runs,
  each run's samples resampled within them) and a paired permutation p-value (two-sided).
* TPS (generated tokens / decode time, over the shared samples that recorded both) and its ratio to the
  baseline; mean and p90 generated length and their ratios; the truncation rate (share of samples stopped by
  max_new_tokens) of each run.

Pairing: a problem is (dataset, id); the runs are compared on the problems every run holds and, within each,
on the sample indices every run holds (a 5-sample run against a 1-sample run uses sample 0 of each). Whatever
is left out, and any difference in model or sampling settings (which the comparison cannot undo), is said in
one line (`note`). Nothing shared is an error.

Seeded like the report's intervals, so the same runs always give the same numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynts.errors import DynTSError
from dynts.harness.lengths import generated_tokens, length_stats
from dynts.harness.metrics import group_records
from dynts.harness.report import flatten
from dynts.harness.store import MANIFEST_FILE, read_manifest, read_records, write_json_atomic, write_text_atomic
from dynts.harness.tables import render_table
from dynts.harness.uncertainty import (
    PAIRED_STREAM,
    PERMUTATION_STREAM,
    BootstrapConfig,
    Verdicts,
    bootstrap_pass1,
    generator,
    interval,
    paired_bootstrap,
    paired_permutation_pvalue,
)

JSON_FILE = "compare.json"
MARKDOWN_FILE = "compare.md"
MEAN = "mean"
# The manifest settings a comparison cannot undo: differences are named in the note.
SETTING_FIELDS = ("model", "sampling", "shuffle_seed")


@dataclass
class ComparedRun:
    """One run directory: its label in the comparison, manifest, and samples (dataset -> id -> index -> record)."""

    label: str
    path: Path
    manifest: dict
    problems: dict[str, dict[str, dict[int, dict]]]

    @property
    def description(self) -> str:
        """The policy as run: NAME, or NAME B=.. W=.. r=.. for a compressing one."""
        policy = self.manifest.get("policy")
        if not isinstance(policy, dict):
            return str(policy or "?")
        name = str(policy.get("registry_name") or policy.get("name") or "?")
        if policy.get("budget") is None:
            return name
        return f"{name} B={policy.get('budget')} W={policy.get('window')} r={policy.get('ratio')}"


@dataclass
class Shared:
    """What every run holds: dataset -> [(problem id, sample indices)], in the baseline's order."""

    problems: dict[str, list[tuple[str, list[int]]]]
    dropped: list[str]
    differences: list[str]

    @property
    def note(self) -> str | None:
        """The one line that says what the comparison left out and which settings differ."""
        parts = []
        if self.dropped:
            parts.append("dropped " + "; ".join(self.dropped))
        if self.differences:
            parts.append("settings differ (compared as stored): " + "; ".join(self.differences))
        return " | ".join(parts) if parts else None


def load_runs(directories: list[str | os.PathLike]) -> list[ComparedRun]:
    """The runs to compare, labelled by their directory names (their paths when names repeat, and #N after a
    directory given twice)."""
    if len(directories) < 2:
        raise DynTSError("compare needs at least two run directories (the first is the baseline)")
    paths = [Path(d) for d in directories]
    for path in paths:
        if not (path / MANIFEST_FILE).is_file():
            hint = ""
            if (path / "sweep.json").is_file():
                hint = f"; it is a sweep directory: compare its cells, e.g. {path / 'cells' / '<cell>'}"
            raise DynTSError(f"{path} is not a dynts run or sweep-cell directory (no {MANIFEST_FILE}){hint}")
    names = [p.name or str(p) for p in paths]
    labels = names if len(set(names)) == len(names) else [str(p) for p in paths]
    labels = [label if labels.count(label) == 1 else f"{label}#{i + 1}" for i, label in enumerate(labels)]
    runs = []
    for label, path in zip(labels, paths):
        records = read_records(path)
        if not records:
            raise DynTSError(f"{path} holds no samples yet; nothing to compare")
        runs.append(ComparedRun(label, path, read_manifest(path), group_records(records)))
    return runs


def shared_samples(runs: list[ComparedRun]) -> Shared:
    """The problems and sample indices every run holds, and what was left out (see the module docstring)."""
    dropped: list[str] = []
    all_datasets = sorted({d for run in runs for d in run.problems})
    datasets = [d for d in all_datasets if all(d in run.problems for run in runs)]
    for dataset in all_datasets:
        if dataset not in datasets:
            holders = [run.label for run in runs if dataset in run.problems]
            dropped.append(f"dataset {dataset} (only in {', '.join(holders)})")
    problems: dict[str, list[tuple[str, list[int]]]] = {}
    for dataset in datasets:
        baseline = runs[0].problems[dataset]
        common = [pid for pid in baseline if all(pid in run.problems[dataset] for run in runs[1:])]
        union = {pid for run in runs for pid in run.problems[dataset]}
        if len(union) > len(common):
            dropped.append(f"{len(union) - len(common)} {dataset} problem(s) not in every run")
        pairs, lost = [], {run.label: 0 for run in runs}
        for pid in common:
            indices = sorted(set.intersection(*(set(run.problems[dataset][pid]) for run in runs)))
            for run in runs:
                lost[run.label] += len(run.problems[dataset][pid]) - len(indices)
            if indices:
                pairs.append((pid, indices))
        if len(pairs) < len(common):
            dropped.append(f"{len(common) - len(pairs)} {dataset} problem(s) with no sample index in every run")
        lost_text = ", ".join(f"{count} of {label}" for label, count in lost.items() if count)
        if lost_text:
            dropped.append(f"{dataset} samples whose index is not in every run ({lost_text})")
        if pairs:
            problems[dataset] = pairs
    if not problems:
        held = "; ".join(
            f"{run.label}: " + ", ".join(f"{d} ({len(p)} problems)" for d, p in sorted(run.problems.items()))
            for run in runs
        )
        raise DynTSError(
            f"the runs share no problem with a common sample index, so there is nothing to compare ({held})"
        )
    return Shared(problems, dropped, _setting_differences(runs))


def compare_runs(directories: list[str | os.PathLike], bootstrap: BootstrapConfig | None = None) -> dict:
    """Compare run directories (the first is the baseline); returns the comparison as a JSON-ready dict."""
    bootstrap = bootstrap or BootstrapConfig()
    runs = load_runs(directories)
    shared = shared_samples(runs)
    rows = []
    per_run: dict[str, dict[str, dict]] = {run.label: {} for run in runs}
    for dataset, pairs in shared.problems.items():
        records = {run.label: _records(run, dataset, pairs) for run in runs}
        for run in runs:
            per_run[run.label][dataset] = _figures(records[run.label], dataset, bootstrap)
        base = records[runs[0].label]
        for run in runs[1:]:
            per_run[run.label][dataset].update(_paired(base, records[run.label], dataset, bootstrap))
    datasets = list(shared.problems)
    for dataset in datasets + ([MEAN] if len(datasets) > 1 else []):
        base_figures = _mean_figures(per_run[runs[0].label]) if dataset == MEAN else None
        for i, run in enumerate(runs):
            if dataset == MEAN:
                figures = _mean_figures(per_run[run.label], paired=i > 0)
                baseline = base_figures
            else:
                figures, baseline = per_run[run.label][dataset], per_run[runs[0].label][dataset]
            rows.append(_row(run, dataset, figures, baseline, i == 0, bootstrap))
    return {
        "baseline": runs[0].label,
        "runs": [
            {
                "label": run.label,
                "path": str(run.path),
                "model": run.manifest.get("model"),
                "policy": run.description,
                "sampling": run.manifest.get("sampling"),
            }
            for run in runs
        ],
        "shared": {
            "datasets": {
                d: {"problems": len(pairs), "samples_per_run": sum(len(ix) for _, ix in pairs)}
                for d, pairs in shared.problems.items()
            },
            "dropped": shared.dropped,
            "setting_differences": shared.differences,
        },
        "note": shared.note,
        "bootstrap": bootstrap.to_dict(),
        "rows": rows,
    }


def write_comparison(comparison: dict, out_dir: str | os.PathLike) -> list[Path]:
    """compare.json and compare.md in out_dir."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DynTSError(f"cannot create {out}: {exc}") from None
    write_json_atomic(out / JSON_FILE, comparison)
    write_text_atomic(out / MARKDOWN_FILE, comparison_markdown(comparison))
    return [out / JSON_FILE, out / MARKDOWN_FILE]


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #


def _pct(v):
    return f"{100 * v:.1f}"


def _signed_points(v):
    return f"{100 * v:+.1f}"


def _columns(comparison: dict) -> list[tuple[str, Any]]:
    percent = f"{100 * comparison['bootstrap']['confidence']:g}%"
    base = comparison["baseline"]
    return [
        ("run", lambda r: r["run"]),
        ("dataset", lambda r: r["dataset"]),
        ("problems", lambda r: str(r["problems"])),
        ("samples", lambda r: str(r["samples"])),
        (f"pass@1 [{percent} CI]", lambda r: _with_interval(r["pass@1"], r["pass@1_ci"], _pct)),
        (f"diff vs {base} [{percent} CI]", lambda r: _with_interval(r["diff"], r["diff_ci"], _signed_points)),
        ("p", lambda r: "-" if r["p_value"] is None else f"{r['p_value']:.3g}"),
        ("TPS", lambda r: _fixed(r["tps"], "{:.1f}")),
        ("TPS ratio", lambda r: _fixed(r["tps_ratio"], "{:.2f}")),
        ("mean len", lambda r: _fixed(r["mean_generated_tokens"], "{:.0f}")),
        ("len ratio", lambda r: _fixed(r["mean_length_ratio"], "{:.2f}")),
        ("p90 len", lambda r: _fixed(r["p90_generated_tokens"], "{:.0f}")),
        ("p90 ratio", lambda r: _fixed(r["p90_length_ratio"], "{:.2f}")),
        ("trunc %", lambda r: "-" if r["truncation_rate"] is None else _pct(r["truncation_rate"])),
    ]


def format_comparison(comparison: dict, markdown: bool = False) -> str:
    """The comparison as a table (terminal-aligned, or Markdown)."""
    columns = _columns(comparison)
    headers = [h for h, _ in columns]
    rows = [[cell(row) for _, cell in columns] for row in comparison["rows"]]
    return render_table(headers, rows, left=2, markdown=markdown)


def describe_runs(comparison: dict) -> str:
    """One line per run: label, policy, path."""
    return "\n".join(
        f"{'baseline' if r['label'] == comparison['baseline'] else 'run':>8} {r['label']}: {r['policy']} ({r['path']})"
        for r in comparison["runs"]
    )


def comparison_markdown(comparison: dict) -> str:
    boot = comparison["bootstrap"]
    lines = [
        "# DynTS run comparison",
        "",
        *[f"- {line.strip()}" for line in describe_runs(comparison).splitlines()],
        "",
    ]
    if comparison.get("note"):
        lines += [f"**Note:** {comparison['note']}", ""]
    lines += [
        format_comparison(comparison, markdown=True),
        "",
        f"Compared on the problems and sample indices every run holds. pass@1 and its difference to "
        f"{comparison['baseline']} are in percent (points); intervals: {100 * boot['confidence']:g}% bootstrap, "
        f"over problems and each problem's samples, paired for the difference ({boot['resamples']} resamples, seed "
        f"{boot['seed']}); p: two-sided paired permutation test (swapping the runs' values within problems, exact "
        "when few problems differ). TPS = generated tokens / decode time; ratios are to the baseline; trunc % is the "
        "share of samples stopped by max_new_tokens. The mean row is the unweighted mean over datasets.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The numbers of one run on the shared samples
# --------------------------------------------------------------------------- #


def _records(run: ComparedRun, dataset: str, pairs: list[tuple[str, list[int]]]) -> list[list[dict]]:
    """Per shared problem (baseline order), the run's records at the shared sample indices."""
    return [[run.problems[dataset][pid][i] for i in indices] for pid, indices in pairs]


def _verdicts(records: list[list[dict]]) -> Verdicts:
    return Verdicts.from_lists([[bool(r.get("correct")) for r in samples] for samples in records])


def _tps(records: list[dict]) -> float | None:
    tokens = seconds = 0.0
    for record in records:
        stats = record.get("stats") if isinstance(record.get("stats"), dict) else {}
        length, time_s = generated_tokens(record), stats.get("time_share_s")
        if length is not None and isinstance(time_s, (int, float)) and not isinstance(time_s, bool):
            tokens += length
            seconds += float(time_s)
    return tokens / seconds if seconds > 0 else None


def _figures(records: list[list[dict]], dataset: str, bootstrap: BootstrapConfig) -> dict:
    verdicts = _verdicts(records)
    flat = [r for samples in records for r in samples]
    replicates = bootstrap_pass1(verdicts, bootstrap.resamples, generator(bootstrap.seed, dataset))
    return {
        "problems": len(records),
        "samples": len(flat),
        "pass@1": verdicts.pass1,
        "replicates": replicates,
        "tps": _tps(flat),
        **length_stats(flat),
    }


def _paired(base: list[list[dict]], other: list[list[dict]], dataset: str, bootstrap: BootstrapConfig) -> dict:
    a, b = _verdicts(base), _verdicts(other)
    rng = generator(bootstrap.seed, dataset, PAIRED_STREAM)
    return {
        "differences": b.accuracy - a.accuracy,
        "diff_replicates": paired_bootstrap(a, b, bootstrap.resamples, rng),
    }


def _mean_figures(by_dataset: dict[str, dict], paired: bool = False) -> dict:
    """The unweighted mean over datasets, replicates averaged replicate by replicate."""
    rows = list(by_dataset.values())
    out: dict[str, Any] = {
        "problems": sum(r["problems"] for r in rows),
        "samples": sum(r["samples"] for r in rows),
        "pass@1": float(np.mean([r["pass@1"] for r in rows])),
        "replicates": np.mean(np.stack([r["replicates"] for r in rows]), axis=0),
    }
    for key in ("tps", "mean_generated_tokens", "median_generated_tokens", "p90_generated_tokens", "truncation_rate"):
        present = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(present)) if present else None
    if paired:
        out["differences"] = [r["differences"] for r in rows]
        out["diff_replicates"] = np.mean(np.stack([r["diff_replicates"] for r in rows]), axis=0)
    return out


def _ratio(value, baseline):
    return None if value is None or baseline in (None, 0) else value / baseline


def _row(
    run: ComparedRun, dataset: str, figures: dict, baseline: dict, is_baseline: bool, bootstrap: BootstrapConfig
) -> dict:
    row = {
        "run": run.label,
        "dataset": dataset,
        "problems": figures["problems"],
        "samples": figures["samples"],
        "pass@1": figures["pass@1"],
        "pass@1_ci": list(interval(figures["replicates"], bootstrap.confidence)),
        "diff": None,
        "diff_ci": None,
        "p_value": None,
        "tps": figures["tps"],
        "tps_ratio": _ratio(figures["tps"], baseline["tps"]),
        "mean_generated_tokens": figures["mean_generated_tokens"],
        "mean_length_ratio": _ratio(figures["mean_generated_tokens"], baseline["mean_generated_tokens"]),
        "median_generated_tokens": figures["median_generated_tokens"],
        "p90_generated_tokens": figures["p90_generated_tokens"],
        "p90_length_ratio": _ratio(figures["p90_generated_tokens"], baseline["p90_generated_tokens"]),
        "truncation_rate": figures["truncation_rate"],
    }
    if not is_baseline:
        differences = figures["differences"]
        arrays = differences if isinstance(differences, list) else [differences]
        rng = generator(bootstrap.seed, dataset, PERMUTATION_STREAM)
        row["diff"] = float(np.mean([np.mean(d) for d in arrays]))
        row["diff_ci"] = list(interval(figures["diff_replicates"], bootstrap.confidence))
        row["p_value"] = paired_permutation_pvalue(arrays, bootstrap.permutations, rng)
    return row


def _setting_differences(runs: list[ComparedRun]) -> list[str]:
    """ "sampling.temperature: A 0.6, B 1.0" for every result-defining setting that is not the same in all runs."""
    out = []
    flat = [dict(flatten({k: run.manifest.get(k) for k in SETTING_FIELDS})) for run in runs]
    for key in sorted(set().union(*flat)):
        values = [json.dumps(f.get(key), sort_keys=True) for f in flat]
        if len(set(values)) > 1:
            out.append(f"{key}: " + ", ".join(f"{run.label} {v}" for run, v in zip(runs, values)))
    return out


def _with_interval(value, ci, fmt) -> str:
    if value is None:
        return "-"
    return fmt(value) if not ci else f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _fixed(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
