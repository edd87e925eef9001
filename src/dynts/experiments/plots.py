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

Only matplotlib's object API is used (no pyplot), so the global backend is never changed.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from dynts.config import FIGURE_KINDS
from dynts.errors import DynTSError
from dynts.experiments.sweep import CellResult, format_ratio, load_cells, write_csv
from dynts.harness.lengths import TRUNCATED, finish_reason, generated_tokens
from dynts.harness.store import read_records
from dynts.policies import POLICIES

KINDS = FIGURE_KINDS
DATASET_ORDER = ("aime24", "aime25", "amc23", "gpqa_d", "math500", "gaokao2023en", "gsm8k", "demo")
DATASET_LABELS = {
    "aime24": "AIME24",
    "aime25": "AIME25",
    "amc23": "AMC23",
    "gpqa_d": "GPQA-D",
    "math500": "MATH500",
    "gaokao2023en": "GaoKao2023En",
    "gsm8k": "GSM8K",
    "demo": "Demo",
}
FULL_COLOR = "0.25"


class _Unsupported(Exception):
    """The data cannot draw this kind of figure (the message says why)."""


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


# --------------------------------------------------------------------------- #
# Selection helpers
# --------------------------------------------------------------------------- #


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DynTSError("dynts plot needs matplotlib: pip install matplotlib (or pip install 'dynts[plot]')") from None


def _order(values, preferred) -> list:
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), str(v)))


def _policy_order(names) -> list[str]:
    return _order(names, list(POLICIES))


def _dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def _model_label(name: str) -> str:
    return name.rstrip("/").replace("\\", "/").split("/")[-1] or name


def _models(cells) -> list[str]:
    return list(dict.fromkeys(c.model for c in cells))


def _datasets(cells) -> list[str]:
    return _order([d for c in cells for d in c.metrics.get("datasets", {})], DATASET_ORDER)


def _metric(cell: CellResult, dataset: str, key: str) -> float | None:
    row = cell.metrics.get("datasets", {}).get(dataset)
    value = row.get(key) if isinstance(row, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _ci_pct(cell: CellResult, dataset: str) -> tuple[float, float] | None:
    """The cell's Pass@1 interval for a dataset in percent, or None (metrics written before intervals)."""
    row = cell.metrics.get("datasets", {}).get(dataset)
    ci = row.get("pass@1_ci") if isinstance(row, dict) else None
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or not all(isinstance(v, (int, float)) for v in ci):
        return None
    return 100.0 * float(ci[0]), 100.0 * float(ci[1])


def _error_bars(values: list[float], cis: list[tuple[float, float] | None]):
    """matplotlib's yerr (2 x N distances below/above each bar), or None when no bar has an interval."""
    if all(ci is None for ci in cis):
        return None
    below = [max(0.0, v - ci[0]) if ci else 0.0 for v, ci in zip(values, cis)]
    above = [max(0.0, ci[1] - v) if ci else 0.0 for v, ci in zip(values, cis)]
    return [below, above]


ERROR_STYLE = {"elinewidth": 0.8, "capsize": 2.0, "ecolor": "0.15"}


def _label_bars(ax, xs, values, cis, fontsize=7.0, rotation=0, layer=None):
    """Each bar's value, written above its whisker (or its top when it has no interval), on a light backing.

    layer: the axes to draw the text on (a twin axes drawn over `ax`, so lines there do not hide the text)."""
    for x, v, ci in zip(xs, values, cis):
        (layer or ax).annotate(
            f"{v:.1f}",
            (x, max(v, ci[1]) if ci else v),
            xycoords=ax.transData,
            xytext=(0, 1.5),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=fontsize,
            rotation=rotation,
            bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "edgecolor": "none", "alpha": 0.7},
        )


def _full_band(ax, full: CellResult, dataset: str) -> float | None:
    """Shade FullKV's Pass@1 interval; returns its top (for the axis limit)."""
    ci = _ci_pct(full, dataset)
    if ci is None:
        return None
    ax.axhspan(ci[0], ci[1], color=FULL_COLOR, alpha=0.12, lw=0)
    return ci[1]


def _frame_filter(cells, opts):
    return [
        c
        for c in cells
        if (opts["window"] is None or c.window == opts["window"])
        and (opts["ratio"] is None or abs(c.ratio - opts["ratio"]) < 1e-9)
    ]


def _pick_frame(cells: list[CellResult]) -> tuple | None:
    """The (W, r) pair covering the most budgets; ties: smallest W, then smallest r."""
    budgets = defaultdict(set)
    for c in cells:
        budgets[(c.window, c.ratio)].add(c.budget)
    if not budgets:
        return None
    return sorted(budgets, key=lambda f: (-len(budgets[f]), f[0], f[1]))[0]


def _series(cells: list[CellResult], model: str, opts) -> dict[str, list[CellResult]]:
    """Per compressing policy of a model: its cells at the chosen (W, r), sorted by budget."""
    out = {}
    compressing = [c for c in cells if c.model == model and c.compresses]
    for policy in _policy_order(c.policy for c in compressing):
        mine = _frame_filter([c for c in compressing if c.policy == policy], opts)
        frame = _pick_frame(mine)
        if frame is None:
            continue
        out[policy] = sorted((c for c in mine if (c.window, c.ratio) == frame), key=lambda c: c.budget)
    return out


def _full(cells, model) -> CellResult | None:
    fulls = [c for c in cells if c.model == model and not c.compresses and c.policy == "full"]
    return fulls[0] if fulls else None


def _series_label(policy: str, cells: list[CellResult]) -> str:
    c = cells[0]
    return f"{policy} (W={c.window}, r={format_ratio(c.ratio)})"


def _colors(policies) -> dict[str, str]:
    palette = [
        "tab:blue",
        "tab:orange",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:olive",
        "tab:cyan",
    ]
    names = [p for p in POLICIES if p != "full"]
    out = {}
    for p in policies:
        out[p] = palette[names.index(p) % len(palette)] if p in names else palette[len(out) % len(palette)]
    return out


def _choose_budget(by_policy: dict[str, list[CellResult]], wanted: int | None) -> int:
    """The budget most policies were run at (ties: the largest), or the one asked for."""
    counts = defaultdict(int)
    for cells in by_policy.values():
        for b in {c.budget for c in cells}:
            counts[b] += 1
    if not counts:
        raise _Unsupported("no compressing policy was run")
    if wanted is not None:
        if wanted not in counts:
            raise _Unsupported(f"no cell at budget {wanted} (budgets run: {', '.join(map(str, sorted(counts)))})")
        return wanted
    return max(counts, key=lambda b: (counts[b], b))


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #


def _new_figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * cols, height * rows))
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _save(figure, stem: Path, rows: list[dict], columns) -> list[Path]:
    png, pdf, csv_path = stem.with_suffix(".png"), stem.with_suffix(".pdf"), stem.with_suffix(".csv")
    figure.savefig(png, dpi=150, bbox_inches="tight")
    figure.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None})
    write_csv(csv_path, columns, rows)
    return [png, pdf, csv_path]


def _legend(figure, axes_list=(), handles=None, labels=None):
    """Lay the panels out, then put one legend above them (savefig uses a tight bounding box)."""
    figure.tight_layout()
    if handles is None:
        handles, labels = [], []
        for ax in axes_list:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels and not lab.startswith("_"):
                    handles.append(h)
                    labels.append(lab)
    if handles:
        longest = max(len(lab) for lab in labels)
        ncol = max(1, min(len(labels), int(figure.get_figwidth() // (0.062 * longest + 0.6))))
        figure.legend(
            handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol, fontsize=8, frameon=False
        )


BUDGET_COLUMNS = (
    "model",
    "dataset",
    "role",
    "policy",
    "budget",
    "window",
    "ratio",
    "pass@1_pct",
    "pass@1_lo_pct",
    "pass@1_hi_pct",
    "tps",
    "cell",
)


def _budget_figure(cells, opts):
    models = [m for m in _models(cells) if _series(cells, m, opts)]
    if not models:
        raise _Unsupported(
            "no compressing policy was run"
            + (" at the chosen --window/--ratio" if opts["window"] is not None or opts["ratio"] is not None else "")
        )
    datasets = {m: _datasets([c for c in cells if c.model == m]) for m in models}
    cols = max(len(v) for v in datasets.values())
    figure, axes = _new_figure(len(models), cols, 4.4, 3.4)
    rows: list[dict] = []
    all_axes = []
    for i, model in enumerate(models):
        series = _series(cells, model, opts)
        colors = _colors(series)
        full = _full(cells, model)
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(datasets[model]):
                ax.axis("off")
                continue
            dataset = datasets[model][j]
            budgets = sorted(
                {c.budget for s in series.values() for c in s if _metric(c, dataset, "pass@1") is not None}
            )
            position = {b: k for k, b in enumerate(budgets)}
            width = 0.8 / max(len(series), 1)
            ax2 = ax.twinx()
            top_pass, top_tps = [10.0], [1e-9]
            for n, (policy, policy_cells) in enumerate(series.items()):
                label = _series_label(policy, policy_cells)
                present = [c for c in policy_cells if _metric(c, dataset, "pass@1") is not None]
                if not present:
                    continue
                xs = [position[c.budget] - 0.4 + width * (n + 0.5) for c in present]
                values = [_pct(_metric(c, dataset, "pass@1")) for c in present]
                cis = [_ci_pct(c, dataset) for c in present]
                tps = [_metric(c, dataset, "tps") for c in present]
                ax.bar(
                    xs,
                    values,
                    width * 0.92,
                    color=colors[policy],
                    alpha=0.8,
                    label=f"{label} Pass@1",
                    yerr=_error_bars(values, cis),
                    error_kw=ERROR_STYLE,
                )
                crowded = len(series) > 1 and len(budgets) > 2
                _label_bars(
                    ax, xs, values, cis, fontsize=6.5 if crowded else 7, rotation=90 if crowded else 0, layer=ax2
                )
                tps_points = [(x, t) for x, t in zip(xs, tps) if t is not None]
                if tps_points:
                    ax2.plot(
                        *zip(*tps_points),
                        color=colors[policy],
                        marker="o",
                        markersize=4,
                        markeredgecolor="black",
                        markeredgewidth=0.5,
                        lw=1.5,
                        label=f"{label} TPS",
                    )
                top_pass += [max(v, ci[1]) if ci else v for v, ci in zip(values, cis)]
                top_tps += [t for t in tps if t is not None]
                for c, v, ci, t in zip(present, values, cis, tps):
                    rows.append(
                        {
                            "model": model,
                            "dataset": dataset,
                            "role": "bar",
                            "policy": policy,
                            "budget": c.budget,
                            "window": c.window,
                            "ratio": c.ratio,
                            "pass@1_pct": v,
                            **_ci_columns(ci),
                            "tps": t,
                            "cell": c.name,
                        }
                    )
            if full is not None and _metric(full, dataset, "pass@1") is not None:
                fp, ft = _pct(_metric(full, dataset, "pass@1")), _metric(full, dataset, "tps")
                ax.axhline(fp, color=FULL_COLOR, ls="--", lw=1, label="FullKV Pass@1")
                band_top = _full_band(ax, full, dataset)
                if band_top is not None:
                    top_pass.append(band_top)
                if ft is not None:
                    ax2.axhline(ft, color=FULL_COLOR, ls=":", lw=1.3, label="FullKV TPS")
                    top_tps.append(ft)
                top_pass.append(fp)
                rows.append(_fullkv_row(model, dataset, full, fp, ft))
            ax.set_ylim(0, max(top_pass) * (1.3 if len(series) > 1 and len(budgets) > 2 else 1.2))
            ax2.set_ylim(0, max(top_tps) * 1.35)
            ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
            ax.set_xlim(-0.6, len(budgets) - 0.4)
            ax.set_xlabel("KV budget (tokens)")
            ax.set_ylabel("Pass@1 (%)")
            ax2.set_ylabel("TPS (tokens/s)")
            ax.set_title(f"{_model_label(model)} | {_dataset_label(dataset)}", fontsize=10)
            all_axes += [ax, ax2]
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = [], []
    for model in models:
        series = _series(cells, model, opts)
        colors = _colors(series)
        for policy, policy_cells in series.items():
            label = _series_label(policy, policy_cells)
            if label not in labels:
                handles.append(Patch(color=colors[policy], alpha=0.8))
                labels.append(label)
    handles += [
        Patch(color="0.6"),
        Line2D([], [], color="0.6", marker="o", markeredgecolor="black", markeredgewidth=0.5),
    ]
    labels += ["bars: Pass@1 (whiskers: 95% interval)", "line: TPS"]
    if any(_full(cells, m) is not None for m in models):
        handles += [Line2D([], [], color=FULL_COLOR, ls="--"), Line2D([], [], color=FULL_COLOR, ls=":", lw=1.3)]
        labels += ["FullKV Pass@1 (band: 95% interval)", "FullKV TPS"]
    _legend(figure, handles=handles, labels=labels)
    return figure, rows, BUDGET_COLUMNS


HEATMAP_COLUMNS = ("model", "dataset", "policy", "budget", "window", "ratio", "pass@1_pct", "cell")


def _heatmap_figure(cells, opts):
    panels = []  # (model, policy, budget, dataset, cells at that budget)
    for model in _models(cells):
        compressing = [c for c in cells if c.model == model and c.compresses]
        for policy in _policy_order(c.policy for c in compressing):
            mine = [c for c in compressing if c.policy == policy]
            by_budget = defaultdict(list)
            for c in mine:
                by_budget[c.budget].append(c)
            candidates = [
                b for b, cs in by_budget.items() if len({c.window for c in cs}) > 1 or len({c.ratio for c in cs}) > 1
            ]
            if opts["budget"] is not None:
                candidates = [b for b in candidates if b == opts["budget"]]
            if not candidates:
                continue
            b = max(candidates)
            for dataset in _datasets(by_budget[b]):
                panels.append((model, policy, b, dataset, by_budget[b]))
    if not panels:
        raise _Unsupported(
            "no policy was run with more than one window or ratio at one budget"
            + (f" (budget {opts['budget']})" if opts["budget"] is not None else "")
        )
    keys = list(dict.fromkeys((m, p) for m, p, *_ in panels))
    cols = max(sum(1 for m, p, *_ in panels if (m, p) == key) for key in keys)
    figure, axes = _new_figure(len(keys), cols, 4.2, 3.6)
    rows = []
    import numpy as np

    for i, key in enumerate(keys):
        mine = [panel for panel in panels if (panel[0], panel[1]) == key]
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(mine):
                ax.axis("off")
                continue
            model, policy, b, dataset, group = mine[j]
            windows = sorted({c.window for c in group})
            ratios = sorted({c.ratio for c in group})
            grid = np.full((len(windows), len(ratios)), np.nan)
            for c in group:
                value = _pct(_metric(c, dataset, "pass@1"))
                if value is None:
                    continue
                grid[windows.index(c.window), ratios.index(c.ratio)] = value
                rows.append(
                    {
                        "model": model,
                        "dataset": dataset,
                        "policy": policy,
                        "budget": b,
                        "window": c.window,
                        "ratio": c.ratio,
                        "pass@1_pct": value,
                        "cell": c.name,
                    }
                )
            from matplotlib import colormaps

            cmap = colormaps["viridis"].with_extremes(bad="0.88")
            finite = grid[np.isfinite(grid)]
            vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
            if vmax - vmin < 1e-9:
                vmin, vmax = vmin - 1, vmax + 1
            image = ax.imshow(
                np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax
            )
            for (y, x), value in np.ndenumerate(grid):
                text = "–" if np.isnan(value) else f"{value:.1f}"
                dark = not np.isnan(value) and (value - vmin) / (vmax - vmin) < 0.6
                ax.text(x, y, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
            ax.set_xticks(range(len(ratios)), [format_ratio(r) for r in ratios])
            ax.set_yticks(range(len(windows)), [str(w) for w in windows])
            ax.set_xlabel("ratio r")
            ax.set_ylabel("window W")
            ax.set_title(f"{_model_label(model)} | {_dataset_label(dataset)}\n{policy}, B={b}: Pass@1 (%)", fontsize=9)
            figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    _legend(figure)
    return figure, rows, HEATMAP_COLUMNS


METHODS_COLUMNS = BUDGET_COLUMNS


def _fullkv_row(model: str, dataset: str, full: CellResult, pass_pct, tps) -> dict:
    """The sidecar CSV row of the FullKV reference line of a figure."""
    return {
        "model": model,
        "dataset": dataset,
        "role": "fullkv",
        "policy": "full",
        "pass@1_pct": pass_pct,
        **_ci_columns(_ci_pct(full, dataset)),
        "tps": tps,
        "cell": full.name,
    }


def _ci_columns(ci: tuple[float, float] | None) -> dict:
    return {"pass@1_lo_pct": ci[0] if ci else None, "pass@1_hi_pct": ci[1] if ci else None}


def _at_one_budget(cells, model, opts) -> tuple[int | None, dict[str, CellResult], CellResult | None]:
    """A model's policies side by side: the budget most of them ran at (or --budget), per compressing policy its
    cell there at its (W, r) pick, and FullKV (None if it was not run)."""
    by_policy = {}
    compressing = [c for c in cells if c.model == model and c.compresses]
    for policy in _policy_order(c.policy for c in compressing):
        mine = _frame_filter([c for c in compressing if c.policy == policy], opts)
        if mine:
            by_policy[policy] = mine
    full = _full(cells, model)
    if not by_policy:
        return None, {}, full
    b = _choose_budget(by_policy, opts["budget"])
    chosen = {}
    for policy, mine in by_policy.items():
        at_b = [c for c in mine if c.budget == b]
        if not at_b:
            continue
        frame = _pick_frame(mine)
        preferred = [c for c in at_b if (c.window, c.ratio) == frame]
        chosen[policy] = (preferred or sorted(at_b, key=lambda c: (c.window, c.ratio)))[0]
    return b, chosen, full


def _methods_figure(cells, opts):
    plans = []  # (model, budget, {policy: cell}, full)
    for model in _models(cells):
        b, chosen, full = _at_one_budget(cells, model, opts)
        if chosen and len(chosen) + (full is not None) >= 2:
            plans.append((model, b, chosen, full))
    if not plans:
        raise _Unsupported("needs at least two policies (FullKV counts) with a compressing one at a common budget")
    datasets = {model: _datasets([c for c in cells if c.model == model]) for model, *_ in plans}
    cols = max(len(v) for v in datasets.values())
    figure, axes = _new_figure(2 * len(plans), cols, max(3.6, 1.0 + 0.8 * max(len(p[2]) for p in plans)), 2.9)
    rows = []
    all_axes = []
    for i, (model, b, chosen, full) in enumerate(plans):
        colors = _colors(chosen)
        for j in range(cols):
            top, bottom = axes[2 * i][j], axes[2 * i + 1][j]
            if j >= len(datasets[model]):
                top.axis("off")
                bottom.axis("off")
                continue
            dataset = datasets[model][j]
            policies = [p for p in chosen if _metric(chosen[p], dataset, "pass@1") is not None]
            xs = range(len(policies))
            values = [_pct(_metric(chosen[p], dataset, "pass@1")) for p in policies]
            cis = [_ci_pct(chosen[p], dataset) for p in policies]
            tps = [_metric(chosen[p], dataset, "tps") for p in policies]
            top.bar(
                xs,
                values,
                0.7,
                color=[colors[p] for p in policies],
                alpha=0.85,
                yerr=_error_bars(values, cis),
                error_kw=ERROR_STYLE,
            )
            _label_bars(top, list(xs), values, cis)
            tps_drawn = [t if t is not None else 0.0 for t in tps]
            bars2 = bottom.bar(xs, tps_drawn, 0.7, color=[colors[p] for p in policies], alpha=0.85)
            bottom.bar_label(bars2, labels=["-" if t is None else f"{t:.1f}" for t in tps], fontsize=7, padding=1)
            for p, v, ci, t in zip(policies, values, cis, tps):
                c = chosen[p]
                rows.append(
                    {
                        "model": model,
                        "dataset": dataset,
                        "role": "bar",
                        "policy": p,
                        "budget": b,
                        "window": c.window,
                        "ratio": c.ratio,
                        "pass@1_pct": v,
                        **_ci_columns(ci),
                        "tps": t,
                        "cell": c.name,
                    }
                )
            tops_pass = [10.0, *(max(v, ci[1]) if ci else v for v, ci in zip(values, cis))]
            tops_tps = [1e-9, *tps_drawn]
            if full is not None and _metric(full, dataset, "pass@1") is not None:
                fp, ft = _pct(_metric(full, dataset, "pass@1")), _metric(full, dataset, "tps")
                top.axhline(fp, color=FULL_COLOR, ls="--", lw=1.2, label="FullKV")
                band_top = _full_band(top, full, dataset)
                tops_pass += [fp] if band_top is None else [fp, band_top]
                if ft is not None:
                    bottom.axhline(ft, color=FULL_COLOR, ls="--", lw=1.2, label="FullKV")
                    tops_tps.append(ft)
                rows.append(_fullkv_row(model, dataset, full, fp, ft))
            top.set_ylim(0, max(tops_pass) * 1.2)
            bottom.set_ylim(0, max(tops_tps) * 1.25)
            labels = [f"{p}\nW={chosen[p].window} r={format_ratio(chosen[p].ratio)}" for p in policies]
            top.set_xticks(list(xs), [p for p in policies])
            bottom.set_xticks(list(xs), labels, fontsize=7)
            top.set_ylabel("Pass@1 (%)")
            bottom.set_ylabel("TPS (tokens/s)")
            top.set_title(f"{_model_label(model)}\n{_dataset_label(dataset)} | B={b}", fontsize=9)
            all_axes += [top, bottom]
    _legend(figure, all_axes)
    return figure, rows, METHODS_COLUMNS


STEPS_COLUMNS = (
    "model",
    "policy",
    "budget",
    "window",
    "ratio",
    "cell",
    "batch",
    "step",
    "active",
    "tps",
    "tps_smoothed",
    "kv_tokens",
    "kv_mib",
)


def _smooth(values: list[float]) -> list[float]:
    import numpy as np

    n = len(values)
    half = max(0, n // 60)
    if half == 0:
        return list(values)
    data = np.asarray(values, dtype=float)
    cumsum = np.concatenate([[0.0], np.cumsum(data)])
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    return list((cumsum[hi] - cumsum[lo]) / (hi - lo))


def _steps_figure(cells, opts):
    plans = []
    for model in _models(cells):
        full = _full(cells, model)
        full_steps = full.steps() if full is not None else None
        by_policy = {}
        for c in cells:
            if c.model == model and c.compresses and c.steps():
                by_policy.setdefault(c.policy, []).append(c)
        by_policy = {p: _frame_filter(v, opts) for p, v in by_policy.items()}
        by_policy = {p: v for p, v in by_policy.items() if v}
        if not full_steps or not by_policy:
            continue
        b = _choose_budget(by_policy, opts["budget"])
        series = [full]
        for policy in _policy_order(by_policy):
            at_b = [c for c in by_policy[policy] if c.budget == b]
            if at_b:
                frame = _pick_frame(by_policy[policy])
                preferred = [c for c in at_b if (c.window, c.ratio) == frame]
                series.append((preferred or sorted(at_b, key=lambda c: (c.window, c.ratio)))[0])
        plans.append((model, b, series))
    if not plans:
        raise _Unsupported(
            "needs step traces (steps.jsonl, recorded by dynts sweep --trace-steps) for FullKV and "
            "at least one compressing policy"
        )
    figure, axes = _new_figure(len(plans), 2, 5.2, 3.4)
    rows = []
    all_axes = []
    for i, (model, _budget, series) in enumerate(plans):
        colors = _colors([c.policy for c in series if c.compresses])
        ax_tps, ax_kv = axes[i][0], axes[i][1]
        probe_note = ""
        for c in series:
            steps = [s for s in c.steps() if s.get("batch", 0) == 0]
            if not steps:
                continue
            probe = c.probe() or {}
            if not probe_note and probe:
                ref = probe.get("prompt") or {}
                probe_note = (
                    f"probe {ref.get('dataset', '?')}/{ref.get('id', '?')}: {probe.get('prompt_tokens')}"
                    f"-token prompt, {probe.get('tokens')} tokens, batch {probe.get('batch')}"
                )
            x = [s["step"] for s in steps]
            tps = [s["active"] / s["step_time_s"] if s.get("step_time_s") else 0.0 for s in steps]
            smooth = _smooth(tps)
            kv = [s["kv_bytes"] / 2**20 for s in steps]
            color = FULL_COLOR if not c.compresses else colors[c.policy]
            label = (
                "FullKV" if not c.compresses else f"{c.policy} (B={c.budget}, W={c.window}, r={format_ratio(c.ratio)})"
            )
            ax_tps.plot(x, tps, color=color, lw=0.6, alpha=0.25)
            ax_tps.plot(x, smooth, color=color, lw=1.6, label=label)
            style = ("-", "--", "-.", ":")[series.index(c) % 4]
            ax_kv.plot(x, kv, color=color, lw=1.4, ls=style, label=label)
            for s, t, sm, k in zip(steps, tps, smooth, kv):
                rows.append(
                    {
                        "model": model,
                        "policy": c.policy,
                        "budget": c.budget,
                        "window": c.window,
                        "ratio": c.ratio,
                        "cell": c.name,
                        "batch": s.get("batch", 0),
                        "step": s["step"],
                        "active": s["active"],
                        "tps": t,
                        "tps_smoothed": sm,
                        "kv_tokens": s["kv_tokens"],
                        "kv_mib": k,
                    }
                )
        ax_tps.set_xlabel("decode step")
        ax_tps.set_ylabel("TPS (tokens/s)")
        ax_tps.set_ylim(bottom=0)
        ax_tps.set_title(f"{_model_label(model)} | throughput vs decode step", fontsize=10)
        ax_kv.set_xlabel("decode step")
        ax_kv.set_ylabel("KV cache (MiB)")
        ax_kv.set_ylim(bottom=0)
        ax_kv.set_title(f"{_model_label(model)} | KV memory vs decode step", fontsize=10)
        if probe_note:
            ax_tps.text(0.01, 0.02, probe_note, transform=ax_tps.transAxes, fontsize=6.5, color="0.35")
        all_axes += [ax_tps, ax_kv]
    _legend(figure, all_axes)
    return figure, rows, STEPS_COLUMNS


LENGTHS_COLUMNS = (
    "model",
    "dataset",
    "policy",
    "budget",
    "window",
    "ratio",
    "cell",
    "id",
    "sample",
    "generated_tokens",
    "finish_reason",
    "max_new_tokens",
)


def _sample_lengths(cell: CellResult) -> dict[str, list[tuple[dict, float]]]:
    """Per dataset, the cell's samples that recorded a length, with that length."""
    out: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for record in read_records(cell.directory):
        length = generated_tokens(record)
        if length is not None:
            out[str(record.get("dataset"))].append((record, length))
    return out


def _max_new_tokens(cell: CellResult) -> int | None:
    sampling = cell.manifest.get("sampling")
    value = sampling.get("max_new_tokens") if isinstance(sampling, dict) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _lengths_figure(cells, opts):
    plans = []  # (model, budget, [cells], {cell name: {dataset: [(record, length)]}})
    for model in _models(cells):
        b, chosen, full = _at_one_budget(cells, model, opts)
        shown = ([full] if full is not None else []) + list(chosen.values())
        samples = {c.name: _sample_lengths(c) for c in shown}
        shown = [c for c in shown if samples[c.name]]
        if shown:
            plans.append((model, b, shown, samples))
    if not plans:
        raise _Unsupported("needs cells with stored samples (samples.jsonl) that recorded generated lengths")
    panels = [
        (model, b, shown, samples, dataset)
        for model, b, shown, samples in plans
        for dataset in _order({d for c in shown for d in samples[c.name]}, DATASET_ORDER)
    ]
    cols = min(len(panels), 4)
    rows_needed = -(-len(panels) // cols)
    width = max(3.6, 1.2 + 0.8 * max(len(p[2]) for p in panels))
    figure, axes = _new_figure(rows_needed, cols, width, 3.3)
    rows = []
    for index in range(rows_needed * cols):
        ax = axes[index // cols][index % cols]
        if index >= len(panels):
            ax.axis("off")
            continue
        model, b, shown, samples, dataset = panels[index]
        present = [c for c in shown if samples[c.name].get(dataset)]
        colors = _colors([c.policy for c in present if c.compresses])
        data = [[length for _, length in samples[c.name][dataset]] for c in present]
        boxes = ax.boxplot(
            data,
            positions=list(range(len(present))),
            widths=0.6,
            whis=(5, 95),
            showfliers=False,
            showmeans=True,
            patch_artist=True,
            meanprops={"marker": "D", "markersize": 4, "markerfacecolor": "white", "markeredgecolor": "black"},
            medianprops={"color": "black", "lw": 1.2},
        )
        for patch, c in zip(boxes["boxes"], present):
            patch.set_facecolor(FULL_COLOR if not c.compresses else colors[c.policy])
            patch.set_alpha(0.55)
        ax.plot(
            [],
            [],
            ls="none",
            marker="D",
            markersize=4,
            markerfacecolor="white",
            markeredgecolor="black",
            label="mean (box: quartiles and median; whiskers: 5th-95th percentile)",
        )
        limits = {m for m in (_max_new_tokens(c) for c in present) if m is not None}
        for limit in limits:
            ax.axhline(limit, color="0.4", ls="--", lw=1, label="max_new_tokens")
        top = max([max(values) for values in data] + list(limits))
        for x, c in enumerate(present):
            pairs = samples[c.name][dataset]
            reasons = [finish_reason(r) for r, _ in pairs]
            known = [r for r in reasons if r is not None]
            if known:
                share = sum(r == TRUNCATED for r in known) / len(known)
                ax.text(x, top * 1.03, f"trunc {100 * share:.0f}%", ha="center", va="bottom", fontsize=7)
            for record, length in pairs:
                rows.append(
                    {
                        "model": model,
                        "dataset": dataset,
                        "policy": c.policy,
                        "budget": c.budget,
                        "window": c.window,
                        "ratio": c.ratio,
                        "cell": c.name,
                        "id": record.get("id"),
                        "sample": record.get("sample"),
                        "generated_tokens": length,
                        "finish_reason": finish_reason(record),
                        "max_new_tokens": _max_new_tokens(c),
                    }
                )
        ax.set_ylim(0, top * 1.15)
        labels = [
            "full" if not c.compresses else f"{c.policy}\nW={c.window} r={format_ratio(c.ratio)}" for c in present
        ]
        ax.set_xticks(range(len(present)), labels, fontsize=7)
        ax.set_ylabel("generated tokens")
        budget_note = f" | B={b}" if b is not None else ""
        ax.set_title(f"{_model_label(model)}\n{_dataset_label(dataset)}{budget_note}", fontsize=9)
    _legend(figure, [ax for row in axes for ax in row])
    return figure, rows, LENGTHS_COLUMNS


_BUILDERS = {
    "budget": _budget_figure,
    "heatmap": _heatmap_figure,
    "methods": _methods_figure,
    "steps": _steps_figure,
    "lengths": _lengths_figure,
}

__all__ = ["KINDS", "plot_sweeps", "supported_kinds"]
