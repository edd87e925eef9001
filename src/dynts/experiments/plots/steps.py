"""The ``steps`` figure: TPS and KV memory against the decode step, from the probes a sweep recorded."""

from __future__ import annotations

from dynts.experiments.plots.selection import (
    _choose_budget,
    _frame_filter,
    _full,
    _models,
    _pick_frame,
    _policy_order,
    _Unsupported,
)
from dynts.experiments.plots.style import FULL_COLOR, _colors, _legend, _model_label, _new_figure
from dynts.experiments.sweep.grid import format_ratio

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
