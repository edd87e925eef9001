"""Turn a run directory into ``metrics.json`` + ``report.md``, and re-grade stored responses.

Reports are always recomputed from ``samples.jsonl``, so they are correct for
partial and resumed runs, and ``regrade`` can apply a fixed grader to old
runs without regenerating anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dynts.errors import DynTSError
from dynts.harness.metrics import summarize
from dynts.harness.records import regraded
from dynts.harness.store import read_manifest, read_records, rewrite_records, write_json_atomic, write_text_atomic
from dynts.harness.tables import render_table

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"

# (header, metrics key, formatter); the pass@1, pass@k and maj@k headers are filled in per table (_headers)
_COLUMNS = (
    ("dataset", None, str),
    ("problems", "n_problems", lambda v: f"{v}"),
    ("samples", "samples_per_problem", lambda v: f"{v}"),
    ("pass@1", "pass@1", lambda v: f"{100 * v:.1f}"),
    ("pass@k", "pass@k", lambda v: f"{100 * v:.1f}"),
    ("maj@k", "maj@k", lambda v: f"{100 * v:.1f}"),
    ("TPS", "tps", lambda v: f"{v:.1f}"),
    ("TPS fwd", "tps_forward", lambda v: f"{v:.1f}"),
    ("peak KV tok", "peak_kv_tokens", lambda v: f"{int(v)}"),
    ("mean len", "mean_generated_tokens", lambda v: f"{v:.0f}"),
    ("median len", "median_generated_tokens", lambda v: f"{v:.0f}"),
    ("p90 len", "p90_generated_tokens", lambda v: f"{v:.0f}"),
    ("trunc %", "truncation_rate", lambda v: f"{100 * v:.1f}"),
)

_MANIFEST_ORDER = (
    "model",
    "policy",
    "head",
    "sampling",
    "seed",
    "samples",
    "datasets",
    "limit",
    "data_source",
    "data_dir",
    "device",
    "dtype",
    "package_version",
    "created_at",
    "updated_at",
    "resumes",
)


def write_report(out_dir: str | os.PathLike, records: list[dict] | None = None) -> dict:
    """Recompute metrics from the stored samples (records: them as a writer already holds them, e.g.
    ResultStore.summaries(); default: read samples.jsonl), write metrics.json and report.md, return the metrics."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    records = read_records(out) if records is None else records
    if not records:
        raise DynTSError(f"{str(out)!r} holds no samples yet; nothing to report")
    metrics = summarize(records)
    write_json_atomic(out / METRICS_FILE, metrics)
    write_text_atomic(out / REPORT_FILE, _markdown(out, manifest, metrics))
    return metrics


def regrade(out_dir: str | os.PathLike, timeout: float | None = None) -> dict:
    """Re-extract and re-grade every stored response with the current grader; return new metrics."""

    out = Path(out_dir)
    records = read_records(out)
    if not records:
        raise DynTSError(f"{str(out)!r} holds no samples to re-grade")
    rewrite_records(out, [regraded(record, timeout) for record in records])
    return write_report(out)


def format_table(metrics: dict, markdown: bool = False) -> str:
    """The metrics as a text table (aligned for a terminal, or a Markdown table).

    pass@1 carries its interval ("44.7 [38.0, 51.3]"); pass@k and maj@k headers carry their k ("pass@5"). When
    the datasets' k differ, each cell names its k instead; when k is 1, pass@k is pass@1 and is left out."""
    datasets = metrics.get("datasets", {})
    columns = _table_columns(metrics)
    mixed = _uniform_k(metrics) is None
    rows = [_row(name, row, columns, mixed) for name, row in datasets.items()]
    if len(datasets) > 1 and metrics.get("mean"):
        rows.append(_row("mean", metrics["mean"], columns, mixed, is_mean=True))
    return render_table([header for header, _, _ in columns], rows, left=1, markdown=markdown)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _uniform_k(metrics: dict) -> int | None:
    """The k every dataset shares, or None when they differ (or there are none)."""
    ks = {row.get("k") for row in metrics.get("datasets", {}).values()}
    return ks.pop() if len(ks) == 1 and None not in ks else None


def _confidence(metrics: dict) -> float:
    bootstrap = metrics.get("bootstrap")
    return float(bootstrap.get("confidence", 0.95)) if isinstance(bootstrap, dict) else 0.95


def _table_columns(metrics: dict) -> list[tuple]:
    """_COLUMNS with the headers this table needs: "pass@1 [95% CI]", "pass@5", "maj@5" (k = 1: no pass@k)."""
    k = _uniform_k(metrics)
    columns = []
    for header, key, fmt in _COLUMNS:
        if key == "pass@1":
            header = f"pass@1 [{100 * _confidence(metrics):g}% CI]"
        elif key in ("pass@k", "maj@k"):
            if k == 1 and key == "pass@k":
                continue  # pass@1 with one sample is avg@1: the same number as the pass@1 column
            if k is not None:
                header = f"{header[:-1]}{k}"
        columns.append((header, key, fmt))
    return columns


def _row(name: str, row: dict, columns: list[tuple], mixed_k: bool, is_mean: bool = False) -> list[str]:
    cells = []
    for _, key, fmt in columns:
        if key is None:
            cells.append(name if row.get("complete", True) else f"{name} (partial)")
            continue
        value = row.get(key)
        text = "-" if value is None else fmt(value)
        if key == "pass@1" and value is not None and row.get("pass@1_ci"):
            lo, hi = row["pass@1_ci"]
            text = f"{text} [{100 * lo:.1f}, {100 * hi:.1f}]"
        if key in ("pass@k", "maj@k") and mixed_k and value is not None:
            text += " (k mixed)" if is_mean else f" (k={row.get('k')})"
        cells.append(text)
    return cells


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ("a.b.c", leaf value) pairs, in order."""
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = []
        for key, inner in value.items():
            items += flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return items
    return [(prefix, value)]


def _text(value: Any) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _interval_note(metrics: dict) -> str:
    bootstrap = metrics.get("bootstrap") or {}
    return (
        f"{100 * _confidence(metrics):g}% interval (a bootstrap over problems and, within each, over its "
        f"samples: {bootstrap.get('resamples', '?')} resamples, seed {bootstrap.get('seed', '?')})"
    )


def _markdown(out: Path, manifest: dict, metrics: dict) -> str:
    keys = [k for k in _MANIFEST_ORDER if k in manifest] + sorted(k for k in manifest if k not in _MANIFEST_ORDER)
    config = [f"- **{name}**: {_text(value)}" for key in keys for name, value in flatten(manifest[key], key)]
    return "\n".join(
        [
            "# DynTS run report",
            "",
            f"Run directory: `{out}`",
            "",
            "## Results",
            "",
            format_table(metrics, markdown=True),
            "",
            "pass@1 = mean accuracy over samples (avg@k), with its "
            f"{_interval_note(metrics)}; "
            "pass@k uses the unbiased estimator; maj@k is a majority vote over extracted answers. "
            "Accuracies are percentages. "
            "TPS = generated tokens / decode wall time including scoring and eviction; "
            "TPS fwd counts forward-pass time only (the paper's figure). "
            "Peak KV is the largest cache length in tokens; mean / median / p90 len are generated tokens per "
            "sample; trunc % is the share of samples stopped by max_new_tokens. "
            "'(partial)' marks datasets whose problems do not all have the same number of samples.",
            "",
            "## Configuration",
            "",
            *config,
            "",
        ]
    )
