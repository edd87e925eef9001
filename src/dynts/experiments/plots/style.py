"""How every figure looks: matplotlib (object API only), labels, colours, interval whiskers, the FullKV band, the
shared legend, and writing KIND.png/.pdf with its sidecar CSV.
"""

from __future__ import annotations

from pathlib import Path

from dynts.errors import DynTSError
from dynts.experiments.plots.selection import _ci_pct
from dynts.experiments.sweep.results import CellResult, write_csv
from dynts.policies import POLICIES

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


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DynTSError("dynts plot needs matplotlib: pip install matplotlib (or pip install 'dynts[plot]')") from None


def _dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def _model_label(name: str) -> str:
    return name.rstrip("/").replace("\\", "/").split("/")[-1] or name


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
