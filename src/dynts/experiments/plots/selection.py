"""Which cells a figure draws: ordering, the (W, r) pair per policy, FullKV, the one budget of the methods, steps
and lengths figures, and the metrics read from each cell.
"""

from __future__ import annotations

from collections import defaultdict

from dynts.experiments.sweep.grid import format_ratio
from dynts.experiments.sweep.results import CellResult
from dynts.policies import POLICIES

DATASET_ORDER = ("aime24", "aime25", "amc23", "gpqa_d", "math500", "gaokao2023en", "gsm8k", "demo")


class _Unsupported(Exception):
    """The data cannot draw this kind of figure (the message says why)."""


def _order(values, preferred) -> list:
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), str(v)))


def _policy_order(names) -> list[str]:
    return _order(names, list(POLICIES))


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
