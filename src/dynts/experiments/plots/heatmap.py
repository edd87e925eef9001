"""The ``heatmap`` figure: Pass@1 over window W x ratio r at one budget, a panel per policy and dataset."""

from __future__ import annotations

from collections import defaultdict

from dynts.experiments.plots.selection import _datasets, _metric, _models, _pct, _policy_order, _Unsupported
from dynts.experiments.plots.style import _dataset_label, _legend, _model_label, _new_figure
from dynts.experiments.sweep.grid import format_ratio

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
