"""How sure the fidelity benchmark's ranking is: paired bootstrap intervals over traces, and the tail.

The benchmark's table gives one position-weighted mean per policy and budget; with 8 or 24 traces nobody can say
from it which gaps are noise. Here the unit is the trace: every policy replays the same traces, so DynTS and a
rival are compared trace by trace.

* Paired difference: per trace, d = (DynTS's mean answer-span KL) - (the rival's), over the traces where both
  have an answer span; the statistic is the mean of d over traces, its interval the percentile interval of a
  bootstrap that resamples traces with replacement (one draw of traces for both policies: paired), seeded per
  (budget, rival) through `harness/uncertainty.py`'s generators, so a run always prints the same interval.
  The verdict is "lower" when the whole interval is below 0, "higher" when it is above 0, else "not
  distinguishable" (always so with fewer than MIN_VERDICT_TRACES paired traces). Also: on how many traces DynTS
  is lower.
* Tail: each policy's worst trace (its largest answer-span KL, with the control's on the same trace), and on how
  many traces it is more than TAIL_FACTOR times the control's KL (the control: Window protecting the prompt).

The trace mean is unweighted (each trace counts once, whatever its answer length), so the mean of d can differ in
sign from the difference of the table's position-weighted means when long answers disagree with short ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynts.errors import DynTSError
from dynts.harness.uncertainty import PAIRED_STREAM, BootstrapConfig, generator, interval
from dynts.policies.options import format_spec

TAIL_FACTOR = 2.0
MIN_VERDICT_TRACES = 4  # fewer paired traces: a bootstrap interval means nothing, the verdict is "not distinguishable"
MINE = "dynts"
INTERVALS_FILE = "intervals.json"
INTERVALS_TABLE = "intervals.md"
LOWER, HIGHER, UNCLEAR = "lower", "higher", "not distinguishable"
METHOD = "paired bootstrap over traces (one draw of traces for both policies); percentile interval"


def label_of(record: dict) -> str:
    return format_spec(record["policy"], record.get("options") or {})


def read_per_trace(path: str | Path) -> dict[str, dict]:
    """{json key: {"key": key, "records": [...], ...}} from a per_trace.jsonl (a torn last line is skipped)."""
    out: dict[str, dict] = {}
    path = Path(path)
    if not path.is_file():
        raise DynTSError(f"{path} holds no per-trace records (run benchmarks/fidelity_paper.py first)")
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        out[json.dumps(item["key"])] = item  # key, records (and whatever else a regime stores per trace)
    return out


def select(per_trace: Mapping[str, dict], keys: Iterable) -> list[dict]:
    """The per-trace items of `keys` (trace keys as the benchmark stores them), in that order, those present."""
    return [per_trace[k] for k in (json.dumps(key) for key in keys) if k in per_trace]


def merge_per_trace(runs: Sequence[Mapping[str, dict]]) -> list[dict]:
    """Several runs' per-trace records on the same traces as one list (traces every run holds, in the first run's
    order); a policy and budget measured by two runs is taken from the first."""
    if not runs:
        return []
    common = [k for k in runs[0] if all(k in run for run in runs[1:])]
    merged = []
    for k in common:
        seen, records = set(), []
        for run in runs:
            for r in run[k]["records"]:
                cell = (label_of(r), r.get("budget"))
                if cell not in seen:
                    seen.add(cell)
                    records.append(r)
        merged.append({"key": runs[0][k]["key"], "records": records})
    return merged


def kl_table(per_trace: Sequence[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """{(policy label, budget): {trace name: answer-span KL}} for the compressing policies."""
    table: dict[tuple[str, int], dict[str, float]] = {}
    for item in per_trace:
        name = trace_name(item["key"])
        for r in item["records"]:
            if r.get("budget") is None or r.get("kl_answer") is None:
                continue
            table.setdefault((label_of(r), r["budget"]), {})[name] = float(r["kl_answer"])
    return table


def trace_name(key) -> str:
    """A short, stable name of a trace from its key (dataset, "id+id+...", sample)."""
    if isinstance(key, (list, tuple)) and len(key) >= 2:
        ids = str(key[1]).split("+")
        head = ids[0] if len(ids) == 1 else f"{ids[0]}+{len(ids) - 1}"
        return f"{key[0]}/{head}"
    return str(key)


@dataclass(frozen=True)
class PairedDifference:
    """DynTS minus one rival at one budget, over paired traces."""

    budget: int
    mine: str
    rival: str
    traces: int
    mean: float  # mean over traces of (mine - rival)
    low: float
    high: float
    lower_on: int  # traces where mine is lower

    @property
    def verdict(self) -> str:
        if self.traces < MIN_VERDICT_TRACES:
            return UNCLEAR
        if self.high < 0:
            return LOWER
        if self.low > 0:
            return HIGHER
        return UNCLEAR

    def as_dict(self) -> dict:
        return {**self.__dict__, "verdict": self.verdict}

    def line(self, percent: str) -> str:
        return (
            f"B={self.budget}: {self.mine} - {self.rival} = {self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] "
            f"({percent}), {self.mine} lower on {self.lower_on}/{self.traces} traces: {self.verdict}"
        )


def bootstrap_mean(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates of the mean of `values` with the values (traces) resampled with replacement."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise DynTSError("a bootstrap over traces needs at least one trace")
    drawn = rng.integers(0, values.size, size=(resamples, values.size))
    return values[drawn].mean(axis=1)


def paired_difference(
    mine: Mapping[str, float], rival: Mapping[str, float], budget: int, names: tuple[str, str], config: BootstrapConfig
) -> PairedDifference | None:
    """The paired difference on the traces both hold (None when they share none)."""
    common = [t for t in mine if t in rival]
    if not common:
        return None
    d = np.array([mine[t] - rival[t] for t in common])
    rng = generator(config.seed, f"fidelity/{budget}/{names[0]}/{names[1]}", PAIRED_STREAM)
    low, high = interval(bootstrap_mean(d, config.resamples, rng), config.confidence)
    return PairedDifference(budget, names[0], names[1], len(common), float(d.mean()), low, high, int((d < 0).sum()))


def paired_differences(
    per_trace: Sequence[dict], mine: str = MINE, config: BootstrapConfig | None = None, rivals: Iterable[str] = ()
) -> list[PairedDifference]:
    """`mine` against every other compressing policy (or just `rivals`) at every budget it ran."""
    config = config or BootstrapConfig()
    table = kl_table(per_trace)
    wanted = set(rivals)
    out = []
    for budget in sorted({b for _, b in table}):
        if (mine, budget) not in table:
            continue
        for label, b in sorted(table):
            if b != budget or label == mine or (wanted and label not in wanted):
                continue
            found = paired_difference(table[mine, budget], table[label, budget], budget, (mine, label), config)
            if found is not None:
                out.append(found)
    return out


@dataclass(frozen=True)
class Tail:
    """One policy's worst trace at one budget, and how often it is far worse than the control."""

    budget: int
    policy: str
    traces: int
    mean: float  # unweighted mean over traces
    worst_trace: str
    worst_kl: float
    control_on_worst: float | None
    over_control: int | None  # traces with KL > TAIL_FACTOR x the control's (None: no control ran)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def tails(per_trace: Sequence[dict], control: str | None, factor: float = TAIL_FACTOR) -> list[Tail]:
    """Per budget and compressing policy: its worst trace and its count of traces over `factor` x the control."""
    table = kl_table(per_trace)
    out = []
    for label, budget in sorted(table, key=lambda c: (c[1], c[0])):
        values = table[label, budget]
        gate = table.get((control, budget)) if control else None
        worst = max(values, key=lambda t: values[t])
        over = None if gate is None else sum(1 for t, v in values.items() if t in gate and v > factor * gate[t])
        out.append(
            Tail(
                budget,
                label,
                len(values),
                float(np.mean(list(values.values()))),
                worst,
                values[worst],
                None if gate is None else gate.get(worst),
                over,
            )
        )
    return out


def summary_lines(differences: Sequence[PairedDifference], config: BootstrapConfig | None = None) -> list[str]:
    config = config or BootstrapConfig()
    return [d.line(config.percent) for d in differences]


def format_tails(found: Sequence[Tail], factor: float = TAIL_FACTOR) -> str:
    header = (
        f"{'policy':<30}{'B':>6}{'traces':>8}{'mean KL':>10}{'worst KL':>10}{'control there':>15}"
        f"{f'> {factor:g}x control':>16}  worst trace"
    )
    lines = [header, "-" * len(header)]
    for t in found:
        control = "-" if t.control_on_worst is None else f"{t.control_on_worst:.4f}"
        over = "-" if t.over_control is None else f"{t.over_control}/{t.traces}"
        lines.append(
            f"{t.policy:<30}{t.budget:>6}{t.traces:>8}{t.mean:>10.4f}{t.worst_kl:>10.4f}{control:>15}{over:>16}"
            f"  {t.worst_trace}"
        )
    return "\n".join(lines)


def format_differences(differences: Sequence[PairedDifference], config: BootstrapConfig | None = None) -> str:
    config = config or BootstrapConfig()
    header = f"{'B':>5}  {'rival':<30}{'mean diff':>11}{f'{config.percent} interval':>24}{'lower on':>10}  verdict"
    lines = [header, "-" * (len(header) + 18)]
    for d in differences:
        lines.append(
            f"{d.budget:>5}  {d.rival:<30}{d.mean:>+11.4f}{f'[{d.low:+.4f}, {d.high:+.4f}]':>24}"
            f"{f'{d.lower_on}/{d.traces}':>10}  {d.verdict}"
        )
    return "\n".join(lines)


def report(per_trace: Sequence[dict], control: str | None, mine: str = MINE, config: BootstrapConfig | None = None):
    """(differences, tails, text) for a benchmark's per-trace records."""
    config = config or BootstrapConfig()
    differences = paired_differences(per_trace, mine, config)
    found = tails(per_trace, control)
    text = (
        f"Paired differences of answer-span KL over traces ({mine} minus rival; bootstrap over traces, "
        f"{config.resamples} resamples, seed {config.seed}):\n"
        + format_differences(differences, config)
        + f"\n\nTail (control: {control or 'none'}):\n"
        + format_tails(found)
    )
    return differences, found, text


def write_report(per_trace: Sequence[dict], out_dir: str | Path, control: str | None, mine: str = MINE):
    """Write OUT/intervals.json and OUT/intervals.md; returns (differences, tails, text) as `report` does."""
    config = BootstrapConfig()
    differences, found, text = report(per_trace, control, mine, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "bootstrap": {**config.to_dict(), "method": METHOD},
        "mine": mine,
        "control": control,
        "tail_factor": TAIL_FACTOR,
        "differences": [d.as_dict() for d in differences],
        "tails": [t.as_dict() for t in found],
    }
    tmp = out / (INTERVALS_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out / INTERVALS_FILE)
    (out / INTERVALS_TABLE).write_text("```\n" + text + "\n```\n")
    return differences, found, text
