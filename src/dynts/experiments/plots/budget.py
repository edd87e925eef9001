"""The ``budget`` figure: Pass@1 bars and a TPS line against the KV budget, per model a row of dataset panels."""

from __future__ import annotations

from dynts.experiments.plots.selection import (
    _ci_columns,
    _ci_pct,
    _datasets,
    _full,
    _fullkv_row,
    _metric,
    _models,
    _pct,
    _series,
    _series_label,
    _Unsupported,
)
from dynts.experiments.plots.style import (
    ERROR_STYLE,
    FULL_COLOR,
    _colors,
    _dataset_label,
    _error_bars,
    _full_band,
    _label_bars,
    _legend,
    _model_label,
    _new_figure,
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
