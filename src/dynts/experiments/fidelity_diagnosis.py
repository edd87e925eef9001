"""Why DynTS loses where it loses: the head's ranking against the true labels, oracle scores, and evictions.

The fidelity benchmark's traces are teacher-forced, so their answer-attention labels (predictor/labels.py, the
same pipeline `dynts label` runs) are known before they are replayed. Three questions follow:

* Does the head rank a trace's thinking tokens as the labels do? Spearman and top-k recall of the head on every
  trace of the benchmark's trace directory, beside recency (what a window keeps) and the attention reference
  (what H2O would rank by), as `dynts train` reports them on held-out traces (predictor/train.py).
* Would DynTS win with the true labels? `dynts:scores=oracle` ranks by them (oracle_hook hands each trace's labels
  to the policy before it is replayed). If the oracle beats the control, the head is what fails; if not, the
  selection frame is (the band kept, what is protected, r).
* What did DynTS evict that the answer needed, and when? eviction_timeline replays one trace and records, per
  compression, the positions that left the cache; the answer's most attended thinking tokens are then listed with
  the compression that evicted them under each policy, and the share of the label mass still cached when the
  answer starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dynts.engine.engine import Engine
from dynts.engine.replay import replay
from dynts.errors import DynTSError
from dynts.experiments.fidelity import Trace
from dynts.models.loading import LoadedModel
from dynts.predictor.labels import label_store, label_trace, load_label_set
from dynts.predictor.ranking import RANKING, evaluate_head, evaluate_recency, evaluate_reference, evaluate_scores


def wants_oracle(engine: Engine) -> bool:
    return getattr(engine.policy.config, "scores", None) == "oracle"


def trace_labels(loaded: LoadedModel, trace: Trace) -> torch.Tensor:
    """The answer-attention label of every position of a trace (prompt included), as `dynts label` computes it."""
    if trace.answer_start is None:
        raise DynTSError("oracle scores need a trace with an answer span")
    ids = list(trace.prompt_ids) + list(trace.token_ids)
    return label_trace(loaded, ids, len(trace.prompt_ids) + trace.answer_start).labels


def oracle_hook(loaded: LoadedModel, engines: dict):
    """A `prepare(trace)` for fidelity_paper.run_benchmark that hands each trace's labels to every engine with
    dynts:scores=oracle; None when no engine wants them."""
    chosen = [e for e in engines.values() if wants_oracle(e)]
    if not chosen:
        return None

    def prepare(trace: Trace) -> None:
        labels = trace_labels(loaded, trace)
        for engine in chosen:
            engine.policy.set_oracle(labels)

    return prepare


def label_directory(loaded: LoadedModel, trace_dir: str | Path, progress: bool = True) -> Path:
    """Label a benchmark's trace directory once (trace_dir/labels); returns it."""
    trace_dir = Path(trace_dir)
    if not (trace_dir / "labels" / "index.json").is_file():
        label_store(loaded, trace_dir, progress=progress)
    return trace_dir


def ranking_table(trace_dir: str | Path, heads: dict, retention: float = 0.4) -> dict[str, dict]:
    """Per scorer (each head by name, recency, attention), Spearman / Kendall / top-k recall averaged over every
    labelled trace of trace_dir (none of them was trained on)."""
    label_set = load_label_set(trace_dir)
    traces = [t for t in range(label_set.num_traces) if label_set.supervised_count(t) > 0]
    out = {}
    for name, head in heads.items():
        figures = evaluate_head(head, label_set, traces, retention)
        out[name] = {k: figures[k] for k in RANKING}
    out["recency"] = evaluate_recency(label_set, traces, retention)
    reference = evaluate_reference(label_set, traces, retention)
    if reference is not None:
        out["attention"] = reference
    # the negated position ranks: what a policy keeping the oldest tokens would score (a floor)
    out["oldest first"] = evaluate_scores(label_set, traces, retention, -label_set.positions.float())
    return {name: {**figures, "traces": len(traces)} for name, figures in out.items()}


def format_ranking(table: dict[str, dict]) -> str:
    header = f"{'scorer':<24}{'Spearman':>10}{'Kendall':>10}{'top-k recall':>14}{'traces':>8}"
    lines = [header, "-" * len(header)]
    for name, f in table.items():
        cells = ["-" if f[k] is None else f"{f[k]:.3f}" for k in RANKING]
        lines.append(f"{name:<24}{cells[0]:>10}{cells[1]:>10}{cells[2]:>14}{f['traces']:>8}")
    return "\n".join(lines)


@dataclass
class Timeline:
    """One policy's replay of one trace: which positions each compression evicted."""

    label: str
    evicted_at: dict[int, int]  # position -> the compression (1-based) that evicted it
    compression_tokens: list[int]  # per compression, how many tokens of the trace had been fed by then
    kept_at_answer: set[int]  # positions cached when the first answer token is fed


def eviction_timeline(engine: Engine, trace: Trace, label: str = "", max_chunk: int = 512) -> Timeline:
    """Replay `trace` under `engine` and record every eviction (the kept positions are read after each forward:
    what left between two forwards was evicted by the compression between them)."""
    prompt_len = len(trace.prompt_ids)
    answer_at = None if trace.answer_start is None else prompt_len + trace.answer_start
    evicted_at: dict[int, int] = {}
    when: list[int] = []
    state = {"kept": set(), "compressions": 0, "at_answer": None}

    def on_logits(first, logits, compressions):
        cache = engine.last_cache
        kept = set(cache.slot["position"][0, : cache.lengths[0]].tolist())
        if compressions > state["compressions"]:
            for position in state["kept"] - kept:
                evicted_at[position] = compressions
            when.extend([prompt_len + first - 1] * (compressions - state["compressions"]))
            state["compressions"] = compressions
        fed_to = prompt_len + first - 1 + len(logits)  # positions [0, fed_to) have entered the cache
        if answer_at is not None and state["at_answer"] is None and fed_to > answer_at:
            state["at_answer"] = {p for p in kept if p < answer_at}
        state["kept"] = kept

    replay(engine, trace.prompt_ids, trace.token_ids, on_logits, max_chunk=max_chunk)
    return Timeline(label, evicted_at, when, state["at_answer"] or set())


def retained_mass(labels: torch.Tensor, timeline: Timeline, thinking: range) -> float:
    """Share of the thinking tokens' label mass still cached when the answer starts."""
    total = float(labels[thinking.start : thinking.stop].sum())
    kept = sum(float(labels[p]) for p in timeline.kept_at_answer if p in thinking)
    return kept / total if total > 0 else float("nan")


def top_tokens(labels: torch.Tensor, thinking: range, count: int) -> list[int]:
    """The `count` thinking positions the answer attends to most, most attended first."""
    span = labels[thinking.start : thinking.stop]
    order = torch.argsort(span, descending=True, stable=True)[:count]
    return [thinking.start + int(i) for i in order]


def format_evictions(
    loaded: LoadedModel,
    trace: Trace,
    labels: torch.Tensor,
    timelines: list[Timeline],
    count: int = 20,
    head_scores: torch.Tensor | None = None,
) -> str:
    """The answer's `count` most attended thinking tokens: their text, label, the head's quantile among the
    thinking tokens, and per policy the compression that evicted them (and after how many fed tokens)."""
    prompt_len = len(trace.prompt_ids)
    ids = list(trace.prompt_ids) + list(trace.token_ids)
    thinking = range(prompt_len, prompt_len + trace.answer_start - len(loaded.think_end_ids))
    total = float(labels[thinking.start : thinking.stop].sum())
    quantile = None
    if head_scores is not None:
        span = head_scores[thinking.start : thinking.stop]
        ranks = torch.argsort(torch.argsort(span)).float() / max(1, span.numel() - 1)
        quantile = {thinking.start + i: float(r) for i, r in enumerate(ranks)}
    header = f"{'pos':>6}{'token':>16}{'label':>10}{'share':>7}" + ("" if quantile is None else f"{'head q':>8}")
    header += "".join(f"{t.label[:22]:>24}" for t in timelines)
    lines = [header, "-" * len(header)]
    for p in top_tokens(labels, thinking, count):
        text = loaded.tokenizer.decode([ids[p]]).replace("\n", "\\n")[:14]
        row = f"{p:>6}{text!r:>16}{float(labels[p]):>10.5f}{float(labels[p]) / total:>7.1%}"
        if quantile is not None:
            row += f"{quantile[p]:>8.2f}"
        for t in timelines:
            c = t.evicted_at.get(p)
            row += f"{'kept' if c is None else f'#{c} at {t.compression_tokens[c - 1]}':>24}"
        lines.append(row)
    lines.append("")
    for t in timelines:
        lines.append(
            f"{t.label}: {len(t.compression_tokens)} compressions; label mass cached at the answer "
            f"{retained_mass(labels, t, thinking):.1%}"
        )
    return "\n".join(lines)
