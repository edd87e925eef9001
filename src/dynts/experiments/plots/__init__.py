"""`dynts plot`: the paper's figures from one or more sweep directories (PNG + PDF + a sidecar CSV each).

Kinds:

* ``budget``  — per model a row of panels, one per dataset: Pass@1 as bars (values printed on them, whiskers:
  the 95% interval) and TPS as a line on a second axis, against the KV budget; one bar group per compressing
  policy, FullKV as dashed (Pass@1, its interval shaded) and dotted (TPS) reference lines.
* ``heatmap`` — Pass@1 over window W x ratio r at a fixed budget: one panel per policy and dataset, at the
  largest budget where the policy was run with more than one W or r.
* ``methods`` — the policies side by side at one budget (Pass@1 with its 95% interval, and TPS rows), FullKV as
  a reference line (its Pass@1 interval shaded).
* ``steps``   — TPS and KV memory against the decode step for FullKV and the compressing policies, from the
  probes the sweep recorded (steps.jsonl).
* ``lengths`` — the generated-length distribution per policy at one budget (as in ``methods``), one panel per
  model and dataset: boxes (quartiles, whiskers at the 5th and 95th percentiles, a diamond at the mean), the
  share of samples stopped by max_new_tokens above each box, and max_new_tokens as a dashed line. Read from
  the cells' samples.jsonl; the CSV holds every sample's length.

Every figure is written as KIND.png and KIND.pdf with KIND.csv beside it, holding exactly the numbers drawn
(Pass@1 and its interval in percent, as on the axis; a cell whose metrics.json predates intervals has none
until `dynts report CELL` rewrites it). When a compressing policy was run with several (W, r) pairs, the
budget / methods / steps / lengths figures use, per policy, the pair that covers the most budgets (ties: the
smallest W, then r), unless --window / --ratio choose one; the CSV and the legend name the pair.

Only matplotlib's object API is used (no pyplot), so the global backend is never changed."""

from __future__ import annotations

from pathlib import Path

from dynts.config import FIGURE_KINDS
from dynts.errors import DynTSError
from dynts.experiments.plots.budget import _budget_figure
from dynts.experiments.plots.heatmap import _heatmap_figure
from dynts.experiments.plots.lengths import _lengths_figure
from dynts.experiments.plots.methods import _methods_figure
from dynts.experiments.plots.selection import _Unsupported
from dynts.experiments.plots.steps import _steps_figure
from dynts.experiments.plots.style import _require_matplotlib, _save
from dynts.experiments.sweep.results import CellResult, load_cells

KINDS = FIGURE_KINDS


def plot_sweeps(
    sweep_dirs,
    out_dir=None,
    kinds=None,
    window: int | None = None,
    ratio: float | None = None,
    budget: int | None = None,
) -> dict[str, list[Path]]:
    """Draw the requested kinds (default: every kind the data supports); returns {kind: [png, pdf, csv]}."""
    dirs = [Path(d) for d in ([sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else sweep_dirs)]
    for d in dirs:
        if not d.is_dir():
            raise DynTSError(f"{d} is not a directory")
    cells = [c for d in dirs for c in load_cells(d)]
    if not cells:
        raise DynTSError(
            f"no finished cells in {', '.join(map(str, dirs))} (expected cells/*/metrics.json written by dynts sweep)"
        )
    explicit = kinds is not None
    kinds = list(KINDS if kinds is None else kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise DynTSError(f"unknown plot kind {kind!r}; choose from {', '.join(KINDS)}")
    _require_matplotlib()
    out = Path(out_dir) if out_dir is not None else dirs[0] / "figures"
    opts = {"window": window, "ratio": ratio, "budget": budget}
    written: dict[str, list[Path]] = {}
    reasons = []
    for kind in kinds:
        try:
            figure, rows, columns = _BUILDERS[kind](cells, opts)
        except _Unsupported as exc:
            if explicit:
                raise DynTSError(f"cannot draw the {kind} figure: {exc}") from None
            reasons.append(f"{kind}: {exc}")
            continue
        out.mkdir(parents=True, exist_ok=True)
        written[kind] = _save(figure, out / kind, rows, columns)
    if not written:
        raise DynTSError("the sweep supports no figure yet (" + "; ".join(reasons) + ")")
    return written


def supported_kinds(cells: list[CellResult], opts: dict | None = None) -> dict[str, str | None]:
    """{kind: None if drawable else the reason why not} (draws nothing to disk)."""
    opts = opts or {"window": None, "ratio": None, "budget": None}
    out = {}
    for kind in KINDS:
        try:
            _BUILDERS[kind](cells, opts)
            out[kind] = None
        except _Unsupported as exc:
            out[kind] = str(exc)
    return out


_BUILDERS = {
    "budget": _budget_figure,
    "heatmap": _heatmap_figure,
    "methods": _methods_figure,
    "steps": _steps_figure,
    "lengths": _lengths_figure,
}

__all__ = ["KINDS", "plot_sweeps", "supported_kinds"]
