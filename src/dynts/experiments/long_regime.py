"""The fidelity benchmark over many compressions (`benchmarks/fidelity_paper.py --regime long`).

The paper's traces run 10k-16k tokens at B = 2500-5000: with W = 0.4 B and r = 0.4 a compression keeps 0.64 B, so
what the answer needs must survive about a dozen compressions. The default regime's GSM8K traces (about 930
tokens) see 3-5. SmolLM2 takes 8k positions, so the same ratio fits at its scale:

* Frame: B = 512 and 768, W = floor(0.4 B), r = 0.4 (a compression keeps 327 and 491 tokens); traces of at least
  LONG_MIN_TOKENS tokens that compress at least LONG_COMPRESSIONS times at the smallest budget, prompt at most 20%
  of what a compression keeps (as in the default regime).
* Traces: many GSM8K *test* problems per trace, teacher-forced (predictor/solution_traces.py), from the second half
  of the split in a seeded order: a one-line instruction, "Problem i: ... Solution: ..." blocks until the trace is
  long enough, `</think>`, then "The answers are: (1) A1; (2) A2; ...". Answer item i needs problem i's result,
  written many compressions earlier for the first problems and none for the last.
* Policies: full, every baseline in both scopes, the prompt-protecting Window control, dynts and its three
  ablations (dynts-random, dynts-bottom, dynts-noquestion).
* Per trace: the records of the default regime (per_trace.jsonl, intervals) and, per policy and budget, each
  answer item's mean KL with the number of compressions between its source (problem i's result in the thinking)
  and the answer: how many compressions it had to survive. `curve.json`, `curve.md` and `curve.png` bin them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dynts.errors import DynTSError
from dynts.experiments import fidelity_paper as paper
from dynts.experiments.fidelity import Trace, measure_engines, write_outputs
from dynts.harness.store import JsonlAppender
from dynts.models.loading import LoadedModel
from dynts.predictor.solution_traces import TraceLayout, solution_traces, write_solution_traces

LONG_BUDGETS = (512, 768)
LONG_COMPRESSIONS = 10  # at the smallest budget
LONG_MIN_TOKENS = 2500
LONG_LIMIT = 6
LONG_DATASET, LONG_SPLIT = "gsm8k", "test"
ABLATIONS = ("dynts-random", "dynts-bottom", "dynts-noquestion")
CURVE_FILE = "curve.json"
BINS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 99))


@dataclass(frozen=True)
class LongFrame(paper.PaperFrame):
    """W = floor(0.4 B) (B need not be a multiple of 5), r = 0.4; LONG_COMPRESSIONS at the smallest budget."""

    budgets: tuple[int, ...] = LONG_BUDGETS

    def __post_init__(self):
        object.__setattr__(self, "budgets", paper.checked_budgets(self.budgets))
        for b in self.budgets:
            self.config(b)

    @property
    def min_compressions(self) -> int:
        return LONG_COMPRESSIONS

    def min_length(self) -> int:
        b = self.budgets[0]
        return max(LONG_MIN_TOKENS, b + (LONG_COMPRESSIONS - 1) * (b - self.kept(b)) + 1)


def default_policies() -> list[str]:
    return [*paper.default_policies(), *ABLATIONS]


def build_long_traces(loaded: LoadedModel, dataset: str, split, data_dir, frame: LongFrame, limit: int, trace_dir):
    """Many problems per trace, teacher-forced, until each trace holds frame.min_length() tokens."""
    problems = paper.benchmark_problems(dataset, split, data_dir)
    if not any(p.solution for p in problems):
        raise DynTSError(f"--regime long needs a dataset with reference solutions, {dataset!r} has none")
    per = max(2, frame.min_length() // 250)  # a GSM8K problem with its solution is about 200 tokens
    layout = TraceLayout(per_trace=(per, per), min_tokens=frame.min_length(), seed=paper.SHUFFLE_SEED)
    traces = solution_traces(loaded, problems, layout, limit=limit)
    if traces:
        write_solution_traces(loaded, traces, trace_dir, layout, {"split": split, "limit": limit, "regime": "long"})
    return "teacher-forced reference solutions, many problems per trace"


@dataclass(frozen=True)
class AnswerItem:
    """Answer item i: its tokens [start, end) in token_ids and the token where its result was written."""

    number: int
    start: int
    end: int
    source: int


def answer_items(loaded: LoadedModel, trace: Trace) -> list[AnswerItem]:
    """The items "(i) A" of a several-problem answer and the last mention of A in problem i's block."""
    if trace.answer_start is None:
        return []
    pieces = [loaded.tokenizer.decode([t]) for t in trace.token_ids]
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += len(piece)
    text = "".join(pieces)

    def token_at(char: int) -> int:
        lo, hi = 0, len(starts) - 1
        while lo < hi:  # the last token starting at or before char
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if starts[mid] <= char else (lo, mid - 1)
        return lo

    answer_char = starts[trace.answer_start]
    answer = text[answer_char:]
    item = re.compile(r"\((\d+)\) ([^;]*?)(?=; \(|\.(?!\d)|$)")  # the last item ends at its period
    marks = [(int(m.group(1)), m.start(), m.group(2)) for m in item.finditer(answer)]
    blocks = [(int(m.group(1)), m.start()) for m in re.finditer(r"Problem (\d+): ", text[:answer_char])]
    block_start = dict(blocks)
    items = []
    for k, (number, offset, value) in enumerate(marks):
        if number not in block_start or not value.strip():
            continue
        following = [s for n, s in blocks if n == number + 1]
        end_char = following[0] if following else answer_char
        source_char = text.rfind(value.strip(), block_start[number], end_char)
        if source_char < 0:
            source_char = end_char - 1
        start = token_at(answer_char + offset)
        stop = token_at(answer_char + marks[k + 1][1]) if k + 1 < len(marks) else len(trace.token_ids)
        items.append(AnswerItem(number, max(start, trace.answer_start), stop, token_at(source_char)))
    return items


def item_curves(trace: Trace, items: list[AnswerItem], kl: torch.Tensor, before: torch.Tensor) -> list[list]:
    """[[item, compressions survived, mean KL], ...] for one policy and budget on one trace."""
    out = []
    for item in items:
        if item.end <= item.start:
            continue
        survived = int(before[item.start] - before[item.source])
        out.append([item.number, survived, float(kl[item.start : item.end].mean())])
    return out


def run_long(
    loaded: LoadedModel,
    keyed: list[tuple[list, Trace]],
    engines: dict,
    out_dir: Path,
    manifest: dict,
    progress: bool = True,
    prepare=None,
) -> list[dict]:
    """Replay each trace under every engine, appending {"key", "records", "items"} to DIR/per_trace.jsonl (a
    rerun resumes); returns the aggregated records and writes the default regime's outputs and the curve."""

    paper.check_manifest(out_dir, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}

    def key_of(item: dict) -> str:
        return json.dumps(item["key"])

    wanted = [json.dumps(key) for key, _ in keyed]
    sizes = [len(t.prompt_ids) + len(t.token_ids) for _, t in keyed]
    with JsonlAppender(out_dir / paper.PER_TRACE_FILE, key_of, keep=lambda item: (key_of(item), item)) as stored:
        done.update(stored.kept())
        bar, finished = paper.trace_progress(sizes, wanted, done, "long regime", progress)
        for (key, trace), name, size in zip(keyed, wanted, sizes):
            if name in done:
                continue
            length = len(trace.token_ids)
            kl = {k: torch.zeros(length) for k in engines}
            before = {k: torch.zeros(length, dtype=torch.long) for k in engines}

            def keep(_index, engine_key, first, values, compressions, kl=kl, before=before):
                kl[engine_key][first : first + len(values)] = values
                before[engine_key][first : first + len(values)] = compressions

            if prepare is not None:
                prepare(trace)
            records = measure_engines(loaded, [trace], engines, progress=False, on_positions=keep)
            items = answer_items(loaded, trace)
            curves = {
                f"{label}|{config.budget}": item_curves(trace, items, kl[label, config], before[label, config])
                for (label, config) in engines
                if config is not None
            }
            done[name] = {"key": key, "records": records, "items": curves}
            stored.append(done[name])
            finished += 1
            bar.set_postfix_str(f"{finished}/{len(keyed)} traces", refresh=False)
            bar.update(size)
    bar.close()
    present = [done[k] for k in wanted if k in done]
    records = paper.aggregate([item["records"] for item in present])
    write_outputs(records, out_dir, {**manifest, "n_traces": len(keyed)})
    write_curve(present, out_dir)
    return records


def curve_table(per_trace: list[dict]) -> dict:
    """{budget: {policy: {bin label: (mean KL, items)}}} over every answer item of every trace."""
    cells: dict = {}
    for item in per_trace:
        for cell, rows in (item.get("items") or {}).items():
            label, _, budget = cell.rpartition("|")
            for _, survived, value in rows:
                name = next(f"{lo}-{hi}" if hi < 99 else f"{lo}+" for lo, hi in BINS if lo <= survived <= hi)
                cells.setdefault(int(budget), {}).setdefault(label, {}).setdefault(name, []).append(value)
    return {
        b: {p: {n: (sum(v) / len(v), len(v)) for n, v in bins.items()} for p, bins in policies.items()}
        for b, policies in cells.items()
    }


def format_curve(table: dict) -> str:
    names = [f"{lo}-{hi}" if hi < 99 else f"{lo}+" for lo, hi in BINS]
    lines = []
    for budget in sorted(table):
        present = [n for n in names if any(n in bins for bins in table[budget].values())]
        header = f"{'B=' + str(budget) + ': policy':<32}" + "".join(f"{n:>10}" for n in present)
        lines += [header, "-" * len(header)]
        counts = next(iter(table[budget].values()))
        lines.append(f"{'(answer items)':<32}" + "".join(f"{counts.get(n, (0, 0))[1]:>10}" for n in present))
        order = sorted(table[budget], key=lambda p: sum(v[0] for v in table[budget][p].values()))
        for policy in order:
            bins = table[budget][policy]
            lines.append(
                f"{policy:<32}" + "".join(f"{bins[n][0]:>10.4f}" if n in bins else f"{'-':>10}" for n in present)
            )
        lines.append("")
    return "\n".join(lines)


def write_curve(per_trace: list[dict], out_dir: Path) -> str:
    """curve.json, curve.md and (with matplotlib) curve.png: answer-item KL against compressions survived."""
    table = curve_table(per_trace)
    (out_dir / CURVE_FILE).write_text(
        json.dumps({str(b): v for b, v in table.items()}, indent=2) + "\n", encoding="utf-8"
    )
    text = (
        "Answer-item KL against the compressions its source survived (columns: compressions between problem i's "
        "result and the answer)\n" + format_curve(table)
    )
    (out_dir / "curve.md").write_text("```\n" + text + "\n```\n")
    try:
        plot_curve(table, out_dir)
    except ImportError:
        pass
    return text


def plot_curve(table: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{lo}-{hi}" if hi < 99 else f"{lo}+" for lo, hi in BINS]
    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4), squeeze=False)
    for ax, budget in zip(axes[0], sorted(table)):
        for policy, bins in sorted(table[budget].items()):
            xs = [i for i, n in enumerate(names) if n in bins]
            style = "-" if policy in ("dynts", paper.control_label()) else ":"
            ax.plot(xs, [bins[names[i]][0] for i in xs], style, marker="o", label=policy)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlabel("compressions survived by the item's source")
        ax.set_ylabel("mean answer-item KL(full || policy)")
        ax.set_title(f"B = {budget}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "curve.png"
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["LongFrame", "answer_items", "build_long_traces", "default_policies", "run_long"]
