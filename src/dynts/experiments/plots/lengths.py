"""The ``lengths`` figure: the generated-length distribution per policy at one budget."""

from __future__ import annotations

from collections import defaultdict

from dynts.experiments.plots.selection import DATASET_ORDER, _at_one_budget, _models, _order, _Unsupported
from dynts.experiments.plots.style import FULL_COLOR, _colors, _dataset_label, _legend, _model_label, _new_figure
from dynts.experiments.sweep.grid import format_ratio
from dynts.experiments.sweep.results import CellResult
from dynts.harness.lengths import TRUNCATED, finish_reason, generated_tokens
from dynts.harness.store import read_records

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
