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
from dynts.harness.store import read_manifest, read_records, rewrite_records, write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"

# (header, metrics key, formatter)
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
)

_MANIFEST_ORDER = (
    "model",
    "policy",
    "budget",
    "window",
    "ratio",
    "head",
    "sampling",
    "seed",
    "samples",
    "max_new_tokens",
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


def write_report(out_dir: str | os.PathLike) -> dict:
    """Recompute metrics from the store, write metrics.json and report.md, return the metrics."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    records = read_records(out)
    if not records:
        raise DynTSError(f"{str(out)!r} holds no samples yet; nothing to report")
    metrics = summarize(records)
    write_json_atomic(out / METRICS_FILE, metrics)
    write_text_atomic(out / REPORT_FILE, _markdown(out, manifest, metrics))
    return metrics


def regrade(out_dir: str | os.PathLike, timeout: float | None = None) -> dict:
    """Re-extract and re-grade every stored response with the current grader; return new metrics."""
    from dynts.harness.datasets import dataset_kind
    from dynts.harness.grading import DEFAULT_TIMEOUT_S, extract_answer, grade_answer

    out = Path(out_dir)
    records = read_records(out)
    if not records:
        raise DynTSError(f"{str(out)!r} holds no samples to re-grade")
    regraded = []
    for record in records:
        kind = record.get("kind") or _kind_of(record["dataset"], dataset_kind)
        extracted = extract_answer(str(record.get("response", "")), kind)
        correct = grade_answer(extracted, str(record["gold"]), kind, timeout=timeout or DEFAULT_TIMEOUT_S)
        regraded.append({**record, "kind": kind, "extracted": extracted, "correct": correct})
    rewrite_records(out, regraded)
    return write_report(out)


def format_table(metrics: dict, markdown: bool = False) -> str:
    """The metrics as a text table (aligned for a terminal, or a Markdown table)."""
    rows = [_row(name, row) for name, row in metrics.get("datasets", {}).items()]
    if len(metrics.get("datasets", {})) > 1 and metrics.get("mean"):
        rows.append(_row("mean", metrics["mean"]))
    headers = [_header(h, metrics) for h, _, _ in _COLUMNS]
    if markdown:
        lines = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt_line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt_line(headers), fmt_line(["-" * w for w in widths])] + [fmt_line(r) for r in rows])


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _kind_of(dataset: str, dataset_kind) -> str:
    try:
        return dataset_kind(dataset)
    except DynTSError:
        return "math"


def _header(header: str, metrics: dict) -> str:
    """ "pass@k" becomes "pass@5" when every dataset has the same k."""
    if header.endswith("@k"):
        ks = {row.get("k") for row in metrics.get("datasets", {}).values()}
        if len(ks) == 1 and None not in ks:
            return f"{header[:-1]}{ks.pop()}"
    return header


def _row(name: str, row: dict) -> list[str]:
    cells = []
    for _, key, fmt in _COLUMNS:
        if key is None:
            cells.append(name if row.get("complete", True) else f"{name} (partial)")
            continue
        value = row.get(key)
        cells.append("-" if value is None else fmt(value))
    return cells


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        items: list[tuple[str, str]] = []
        for key, inner in value.items():
            items += _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return items
    if isinstance(value, list):
        return [(prefix, ", ".join(str(v) for v in value))]
    return [(prefix, str(value))]


def _markdown(out: Path, manifest: dict, metrics: dict) -> str:
    keys = [k for k in _MANIFEST_ORDER if k in manifest] + sorted(k for k in manifest if k not in _MANIFEST_ORDER)
    config = [f"- **{name}**: {text}" for key in keys for name, text in _flatten(manifest[key], key)]
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
            "pass@1 = mean accuracy over samples (avg@k); pass@k uses the unbiased estimator; "
            "maj@k is a majority vote over extracted answers. Accuracies are percentages. "
            "TPS = generated tokens / decode wall time including scoring and eviction; "
            "TPS fwd counts forward-pass time only (the paper's figure). "
            "Peak KV is the largest cache length in tokens; mean len is generated tokens per sample. "
            "'(partial)' marks datasets whose problems do not all have the same number of samples.",
            "",
            "## Configuration",
            "",
            *config,
            "",
        ]
    )
