"""The ``methods`` figure: the policies side by side at one budget, FullKV as the reference."""

from __future__ import annotations

from dynts.experiments.plots.budget import BUDGET_COLUMNS
from dynts.experiments.plots.selection import (
    _at_one_budget,
    _ci_columns,
    _ci_pct,
    _datasets,
    _fullkv_row,
    _metric,
    _models,
    _pct,
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
from dynts.experiments.sweep.grid import format_ratio

METHODS_COLUMNS = BUDGET_COLUMNS


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
