"""The fidelity benchmark in the paper's proportions (`benchmarks/fidelity_paper.py`).

The paper compresses thousands-of-tokens R1 traces at B = 5000, W = 2000 (W/B = 0.4), r = 0.4, with 100-200 token
prompts: the protected prompt is 10-15% of what a compression keeps, and a trace compresses several times. Our
first fidelity runs protected a 111-token prompt inside 168-360 kept slots with W/B = 0.06-0.125, which measures
prompt protection more than token selection. This benchmark keeps the paper's shape at the embedded model's scale:

* Frame: W = 0.4 B and r = 0.4 at every budget, so a compression keeps W + floor(r (B - W)) = 0.64 B tokens.
* Traces qualify when the prompt is at most 20% of what a compression keeps (at the smallest budget) and the
  trace compresses at least 3 times (at the largest budget); the others are skipped with a note, and fewer than
  4 qualifying traces is an error.
* Traces: for a dataset with reference solutions (GSM8K, MATH), teacher-forced several-problem traces
  (`predictor/solution_traces.py`): a one-line instruction as the prompt, problems and their solutions as the
  thinking until the trace is long enough, then `</think>` and an answer restating every final answer, which
  needs tokens from far back. A 135M model's own long greedy traces are repetitive loops whose next tokens are
  easy to predict whatever is evicted; reference solutions are coherent. Problems come from the second half of
  the split in a seeded order, so they are disjoint from `dynts collect --limit N` for N up to half the split
  (the shipped head's training problems among them). A dataset without solutions falls back to the model's own
  greedy traces, and the output says so.
* Policies: every baseline in both scopes, `dynts`, and the Window control that protects the whole prompt (so
  prompt protection and head quality can be told apart), with `full` as the reference.

Traces are replayed one at a time (the machinery of `dynts fidelity`, experiments/fidelity.py); each trace's
records are appended to DIR/per_trace.jsonl as it finishes, DIR/fidelity.json is re-aggregated after each, and a
rerun with the same settings resumes.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dynts.config import (
    FIDELITY_POLICIES,
    PAPER_BUDGET,
    PAPER_RATIO,
    PAPER_WINDOW,
    BudgetConfig,
    SamplingConfig,
    paper_window,
    parse_names,
)
from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.experiments.fidelity import Trace, make_trace, measure_engines, scope_of
from dynts.experiments.fidelity import format_table as fidelity_table
from dynts.harness.datasets import Problem, load_dataset
from dynts.harness.evaluate import EvalPlan, run_eval
from dynts.harness.store import MANIFEST_FILE, JsonlAppender, manifest_differences, read_manifest, read_records
from dynts.models.importance_head import head_digest as weights_digest
from dynts.models.loading import LoadedModel
from dynts.policies.options import format_spec
from dynts.policies.registry import option_names, resolve_spec
from dynts.predictor.solution_traces import TraceLayout, solution_traces, write_solution_traces

RATIO = PAPER_RATIO  # r, the paper's R1-Qwen setting
PROMPT_SHARE = 0.2  # the protected prompt may take at most this share of what a compression keeps
MIN_COMPRESSIONS = 3
MIN_TRACES = 4
DEFAULT_BUDGETS = (400, 500)
SCOPED = ("h2o", "snapkv", "rkv")  # the baselines that rank per layer and KV head, or shared with `scope=shared`
BASELINES = ("window", "streaming", "sepllm", *SCOPED)
PROMPT_WINDOW = "window:protect_prompt=true"  # the control: Window that never evicts the prompt
PER_TRACE_FILE = "per_trace.jsonl"
SHUFFLE_SEED = 16


def checked_budgets(budgets) -> tuple[int, ...]:
    """A benchmark's budgets, sorted: at least two distinct positive integers."""
    budgets = tuple(budgets)
    if not budgets or any(not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in budgets):
        raise DynTSError(f"budgets must be positive integers, got {budgets}")
    if len(set(budgets)) < 2:
        raise DynTSError("the benchmark compares at least two distinct budgets")
    return tuple(sorted(budgets))


@dataclass(frozen=True)
class PaperFrame:
    """B / W / r at each budget, W = config.paper_window(B) = 0.4 B (exact: B a multiple of 5), r = RATIO."""

    budgets: tuple[int, ...] = DEFAULT_BUDGETS

    def __post_init__(self):
        budgets = checked_budgets(self.budgets)
        off = [b for b in budgets if (b * PAPER_WINDOW) % PAPER_BUDGET]
        if off:
            raise DynTSError(f"W/B = 0.4 needs budgets that are multiples of 5, got {off}")
        object.__setattr__(self, "budgets", budgets)
        for b in self.budgets:
            self.config(b)  # a frame that frees nothing fails here

    @property
    def min_compressions(self) -> int:
        return MIN_COMPRESSIONS

    def window(self, budget: int) -> int:
        return paper_window(budget)

    def config(self, budget: int) -> BudgetConfig:
        return BudgetConfig(budget, self.window(budget), RATIO)

    def kept(self, budget: int) -> int:
        """Tokens a compression keeps: W + floor(r (B - W))."""
        return self.config(budget).kept_after_compression(budget)

    def max_prompt(self) -> int:
        """The longest prompt that is at most PROMPT_SHARE of what a compression keeps, at every budget."""
        return int(math.floor(PROMPT_SHARE * self.kept(self.budgets[0]) + 1e-9))

    def min_length(self) -> int:
        """Prompt + generated tokens for MIN_COMPRESSIONS compressions at every budget: the cache reaches B once,
        then again every B - kept tokens, and one token more follows the last compression."""
        b = self.budgets[-1]
        return b + (MIN_COMPRESSIONS - 1) * (b - self.kept(b)) + 1

    def compressions(self, length: int, budget: int) -> int:
        """How often a replayed sequence of `length` tokens (prompt included) compresses at `budget`: whenever the
        cache reaches B, except after the last token (nothing is decoded after it)."""
        if length - 1 < budget:
            return 0
        return 1 + (length - 1 - budget) // (budget - self.kept(budget))

    def describe(self) -> list[dict]:
        return [{"budget": b, "window": self.window(b), "ratio": RATIO, "kept": self.kept(b)} for b in self.budgets]


def skip_reason(frame: PaperFrame, trace: Trace) -> str | None:
    """Why a trace does not fit the benchmark, or None."""
    prompt, length = len(trace.prompt_ids), len(trace.prompt_ids) + len(trace.token_ids)
    if prompt > frame.max_prompt():
        return f"prompt over {frame.max_prompt()} tokens ({PROMPT_SHARE:.0%} of what a compression keeps)"
    if length < frame.min_length():
        return f"under {frame.min_length()} tokens (fewer than {frame.min_compressions} compressions)"
    if trace.answer_start is None:
        return "no answer span"
    return None


def select_traces(frame: PaperFrame, keyed: list[tuple[list, Trace]], limit: int) -> tuple[list, Counter]:
    """The first `limit` qualifying (key, trace) pairs and a count of skip reasons; fewer than MIN_TRACES qualifying
    traces raise one error that says why the others were skipped."""
    kept, skipped = [], Counter()
    for key, trace in keyed:
        reason = skip_reason(frame, trace)
        if reason is not None:
            skipped[reason] += 1
        elif len(kept) < limit:
            kept.append((key, trace))
    if len(kept) < MIN_TRACES:
        why = "; ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none was built"
        raise DynTSError(f"only {len(kept)} traces fit the paper's proportions (at least {MIN_TRACES} needed): {why}")
    return kept, skipped


def benchmark_problems(dataset: str, split: str | None, data_dir) -> list[Problem]:
    """The second half of the split, in a seeded order (disjoint from the first problems `collect --limit` takes)."""
    problems = load_dataset(dataset, data_dir=data_dir, split=split)
    tail = problems[len(problems) // 2 :]
    random.Random(SHUFFLE_SEED).shuffle(tail)
    return tail


def build_traces(
    loaded: LoadedModel,
    dataset: str,
    split: str | None,
    data_dir,
    frame: PaperFrame,
    limit: int,
    trace_dir: Path,
    progress: bool = True,
) -> str:
    """Write the reference traces into trace_dir (resumable); returns how they were made."""
    problems = benchmark_problems(dataset, split, data_dir)
    if any(p.solution for p in problems):
        layout = TraceLayout(per_trace=(2, 2), min_tokens=frame.min_length(), seed=SHUFFLE_SEED)
        traces = solution_traces(loaded, problems, layout, limit=limit)
        if traces:
            write_solution_traces(loaded, traces, trace_dir, layout, {"split": split, "limit": limit})
        return "teacher-forced reference solutions, several problems per trace"
    # no solutions: an evaluation set, which no head trains on, so its first problems will do
    engine = Engine(loaded, "full", None, SamplingConfig(greedy=True, max_new_tokens=frame.min_length()), batch_size=4)
    plan = EvalPlan(datasets=[dataset], samples=1, limit=limit, data_dir=data_dir, split=split)
    run_eval(engine, plan, trace_dir, progress=progress, extra_manifest={"purpose": "traces", "correct_only": False})
    return "the model's own greedy traces (the dataset has no reference solutions)"


def stored_traces(loaded: LoadedModel, trace_dir: Path) -> list[tuple[list, Trace]]:
    """(key, trace) for every stored trace, in order."""
    records = [r for r in read_records(trace_dir) if r.get("prompt_ids") and r.get("token_ids")]
    return [
        ([r["dataset"], r["id"], r["sample"]], make_trace(loaded, r["prompt_ids"], r["token_ids"])) for r in records
    ]


def aggregate(per_trace: list[list[dict]]) -> list[dict]:
    """One record per policy and budget over several traces' records: position-weighted means, summed counts."""
    merged: dict[tuple, dict] = {}
    for records in per_trace:
        for r in records:
            key = (r["policy"], json.dumps(r.get("options") or {}, sort_keys=True), r["budget"])
            cell = merged.setdefault(key, {**r, "traces": 0, "compressions": 0, "_sums": Counter()})
            cell["traces"] += r.get("traces", 1)
            cell["compressions"] += r.get("compressions", 0)
            for span in ("answer", "after", "all"):
                n = r.get(f"positions_{span}", 0)
                cell["_sums"][f"positions_{span}"] += n
                for figure in ("kl", "top1"):
                    value = r.get(f"{figure}_{span}")
                    if value is not None and n:
                        cell["_sums"][f"{figure}_{span}"] += value * n
    out = []
    for cell in merged.values():
        sums = cell.pop("_sums")
        for span in ("answer", "after", "all"):
            n = sums[f"positions_{span}"]
            cell[f"positions_{span}"] = n
            for figure in ("kl", "top1"):
                cell[f"{figure}_{span}"] = sums[f"{figure}_{span}"] / n if n else None
        cell["scope"] = scope_of(cell["policy"], cell.get("options") or {})
        out.append(cell)
    return out


def label_of(record: dict) -> str:
    return format_spec(record["policy"], record.get("options") or {})


def control_label() -> str | None:
    """The prompt-protecting Window as the records name it (None while no policy has that option)."""
    try:
        name, options = resolve_spec(PROMPT_WINDOW)
    except DynTSError:
        return None
    return format_spec(name, dict(options))


def format_table(records: list[dict]) -> str:
    """The records with their scopes, by budget and, within one, by answer-span KL."""
    order = sorted(records, key=lambda r: (r["budget"] or 0, r["kl_answer"] if r["kl_answer"] is not None else 1e9))
    return fidelity_table(order, with_scope=True)


def verdict(records: list[dict]) -> list[str]:
    """Per budget: does `dynts` have the lowest answer-span KL of every shared-scope baseline, and beat the control?"""
    control = control_label()
    lines = []
    for budget in sorted({r["budget"] for r in records if r["budget"]}):
        here = [r for r in records if r["budget"] == budget and r["kl_answer"] is not None]
        mine = [r for r in here if label_of(r) == "dynts"]
        if not mine:
            continue
        kl = mine[0]["kl_answer"]
        shared = [
            r
            for r in here
            if r["policy"] in BASELINES and r.get("scope") in (None, "shared") and label_of(r) != control
        ]
        worse = [label_of(r) for r in shared if r["kl_answer"] <= kl]
        line = f"B={budget}: dynts KL answer {kl:.4f}; "
        if not shared:
            line += "no shared-scope baseline ran"
        elif worse:
            line += f"not lower than {', '.join(worse)}"
        else:
            line += f"lowest of the {len(shared)} shared-scope baselines"
        gate = [r for r in here if label_of(r) == control]
        if gate:
            line += f"; {'beats' if kl < gate[0]['kl_answer'] else 'does not beat'} the prompt-protecting Window"
            line += f" ({gate[0]['kl_answer']:.4f})"
        lines.append(line)
    return lines


def head_digest(engines: dict) -> str | None:
    """A short digest of the importance heads the engines use (None without one): a rerun after a head changed must
    not mix two heads' results. One head: its digest; several (`dynts:head=PATH` beside the run's): theirs joined
    with '+', in the engines' order."""
    heads = [e.policy.head for e in engines.values() if getattr(e.policy, "head", None) is not None]
    digests = list(dict.fromkeys(weights_digest(head) for head in heads))
    return "+".join(digests) if digests else None


def check_manifest(out_dir: Path, manifest: dict) -> None:
    """A rerun must measure the same thing as the run it resumes (the trace count may grow)."""
    if not (out_dir / MANIFEST_FILE).is_file() or not (out_dir / PER_TRACE_FILE).is_file():
        return
    stored = read_manifest(out_dir)
    fixed = ("model", "dataset", "split", "frame", "policies", "head", "head_digest")
    differs = manifest_differences(stored, manifest, fixed)
    if differs:
        raise DynTSError(
            f"{out_dir} holds a run with other settings ({'; '.join(differs)}); use a new --out or the same settings"
        )


def trace_progress(sizes: list[int], wanted: list[str], done, desc: str, progress: bool):
    """A bar with one update per trace, weighted by its tokens (its replay cost), so the estimate of the time left
    holds when trace lengths differ; shown in a log file too, resumed traces excluded from the rate.
    Returns (bar, traces already done)."""
    from tqdm import tqdm

    finished = sum(k in done for k in wanted)
    bar = tqdm(
        total=sum(sizes),
        initial=sum(n for n, k in zip(sizes, wanted) if k in done),
        unit="tok",
        desc=desc,
        smoothing=0,
        disable=not progress,
    )
    bar.set_postfix_str(f"{finished}/{len(wanted)} traces")
    return bar, finished


def run_benchmark(
    loaded: LoadedModel,
    keyed: list[tuple[list, Trace]],
    engines: dict,
    out_dir: Path,
    manifest: dict,
    progress: bool = True,
    on_trace=None,
    prepare=None,
) -> list[dict]:
    """Replay each trace under every engine (resuming from DIR/per_trace.jsonl); returns the aggregated records.
    prepare(trace), when given, runs before a trace is replayed (fidelity_diagnosis.oracle_hook: oracle labels)."""

    from dynts.experiments.fidelity import write_outputs

    check_manifest(out_dir, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, list[dict]] = {}
    wanted = [json.dumps(key) for key, _ in keyed]
    records: list[dict] = []

    def key_of(item: dict) -> str:
        return json.dumps(item["key"])

    sizes = [len(t.prompt_ids) + len(t.token_ids) for _, t in keyed]
    with JsonlAppender(out_dir / PER_TRACE_FILE, key_of, keep=lambda item: (key_of(item), item["records"])) as stored:
        done.update(stored.kept())
        bar, finished = trace_progress(sizes, wanted, done, "fidelity", progress)
        for (key, trace), name, size in zip(keyed, wanted, sizes):
            if name not in done:
                if prepare is not None:
                    prepare(trace)
                done[name] = measure_engines(loaded, [trace], engines, progress=False)
                stored.append({"key": key, "records": done[name]})
                finished += 1
                bar.set_postfix_str(f"{finished}/{len(keyed)} traces", refresh=False)
                bar.update(size)
            records = aggregate([done[k] for k in wanted if k in done])
            if on_trace is not None:
                on_trace(records)
    bar.close()
    write_outputs(records, out_dir, {**manifest, "n_traces": len(keyed)})
    return records


def scoped_specs(name: str) -> list[str]:
    """A baseline in both scopes (per-head, its default, and shared); the bare name for a policy without one."""
    return [name, f"{name}:scope=shared"] if "scope" in option_names(name) else [name]


def default_policies() -> list[str]:
    """full, the baselines in both scopes, dynts and the prompt-protecting Window control."""
    return list(FIDELITY_POLICIES)


def policies_from_text(text: str | None) -> list[str]:
    """The policy list (default_policies() when none is given); each spec is checked against the registry."""
    policies = parse_names(text, "--policies") if text else default_policies()
    for spec in policies:
        try:
            resolve_spec(spec)
        except DynTSError as exc:
            raise DynTSError(
                f"policy {spec!r}: {exc} (the default list needs the policies' scope and protect_prompt "
                "options; pass --policies to run a subset)"
            ) from None
    return policies
