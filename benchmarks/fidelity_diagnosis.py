"""Diagnose a fidelity-benchmark run: the head's ranking on its traces, and the worst trace's evictions.

    python benchmarks/fidelity_diagnosis.py RUN_DIR [--head NAME=PATH ...] [--budget B] [--top 20]

RUN_DIR is an output directory of benchmarks/fidelity_paper.py (or a `dynts collect` trace directory, for the
ranking alone). Labels its traces once (RUN_DIR/traces/labels,
the `dynts label` pipeline), prints Spearman, Kendall and top-k recall (r = 0.4) of the shipped head (and each
--head) against the true answer-attention labels on every trace, beside recency and the attention reference; then
replays DynTS's worst trace (largest answer-span KL at --budget, default: the budget where it is worst) under
dynts, dynts:scores=oracle and the prompt-protecting Window, and lists the answer's most attended thinking tokens
with the compression that evicted each (src/dynts/experiments/fidelity_diagnosis.py). Writes RUN_DIR/diagnosis.md
and RUN_DIR/diagnosis.json. The oracle's benchmark figures come from
`benchmarks/fidelity_paper.py ... --policies full,dynts:scores=oracle` (same traces, another --out) and
`benchmarks/fidelity_intervals.py RUN_DIR ORACLE_DIR --mine dynts:scores=oracle`. A few minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from dynts.errors import DynTSError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a benchmarks/fidelity_paper.py output directory")
    p.add_argument("--head", action="append", default=[], help="NAME=PATH: another head to rank with (repeatable)")
    p.add_argument("--budget", type=int, default=None, help="budget of the worst trace (default: where it is worst)")
    p.add_argument("--top", type=int, default=20, help="answer-attended tokens to list (default 20)")
    p.add_argument("--ranking-only", action="store_true", help="the ranking table alone (no replays)")
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args(argv)
    try:
        return run(args)
    except DynTSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    from dynts.errors import DynTSError
    from dynts.experiments import fidelity_diagnosis as diagnosis
    from dynts.experiments import fidelity_intervals as intervals
    from dynts.experiments import fidelity_paper as paper
    from dynts.experiments.fidelity import build_engines
    from dynts.models.importance_head import ImportanceHead, resolve_head
    from dynts.models.loading import load_model
    from dynts.predictor.labels import label_trace
    from dynts.predictor.ranking import predict

    run_dir = Path(args.run)
    manifest = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    loaded = load_model(args.model, device="cpu", dtype="fp32")
    heads = {"shipped head": resolve_head(manifest.get("head"), loaded)}
    for text in args.head:
        name, sep, path = text.partition("=")
        if not sep:
            raise DynTSError(f"--head takes NAME=PATH, got {text!r}")
        heads[name] = ImportanceHead.load(path, expected_hidden_size=loaded.hidden_size)
    traces = run_dir / "traces" if (run_dir / "traces").is_dir() else run_dir  # or a `dynts collect` directory
    trace_dir = diagnosis.label_directory(loaded, traces)
    ranking = diagnosis.ranking_table(trace_dir, heads)
    out = [
        "Ranking against the true answer-attention labels (every trace of the run):",
        diagnosis.format_ranking(ranking),
    ]

    path = run_dir / paper.PER_TRACE_FILE
    table = intervals.kl_table(list(intervals.read_per_trace(path).values())) if path.is_file() else {}
    budgets = sorted(b for label, b in table if label == "dynts")
    if not budgets or args.ranking_only:
        text = "\n".join(out)
        print(text + ("" if args.ranking_only else f"\n\n(no dynts records in {path}: no worst trace)"))
        (run_dir / "diagnosis.md").write_text("```\n" + text + "\n```\n")
        (run_dir / "diagnosis.json").write_text(json.dumps({"ranking": ranking}, indent=2) + "\n")
        return 0
    if args.budget is not None and args.budget not in budgets:
        raise DynTSError(f"--budget {args.budget}: the run measured dynts at {budgets}")
    worst = {b: max(table["dynts", b].items(), key=lambda kv: kv[1]) for b in budgets}
    budget = args.budget or max(worst, key=lambda b: worst[b][1])
    name, kl = worst[budget]
    control = paper.control_label()
    keyed = dict((intervals.trace_name(k), (k, t)) for k, t in paper.stored_traces(loaded, run_dir / "traces"))
    _, trace = keyed[name]
    frame = paper.PaperFrame(tuple(sorted({budget, budget + 5})))  # the window and ratio of this budget
    specs = ["dynts", "dynts:scores=oracle", control]
    engines = build_engines(loaded, specs, [budget], frame.window(budget), paper.RATIO, head=heads["shipped head"])
    labels = diagnosis.trace_labels(loaded, trace)
    for engine in engines.values():
        if diagnosis.wants_oracle(engine):
            engine.policy.set_oracle(labels)
    ids = list(trace.prompt_ids) + list(trace.token_ids)
    hidden = label_trace(loaded, ids, len(trace.prompt_ids) + trace.answer_start).hidden
    head_scores = predict(heads["shipped head"], hidden)
    timelines = [diagnosis.eviction_timeline(e, trace, label) for (label, _), e in engines.items()]
    kls = {label: table.get((label, budget), {}).get(name) for label in specs}
    out += [
        "",
        f"Worst dynts trace at B={budget}: {name} ({len(ids)} tokens), answer-span KL "
        + ", ".join(f"{label} {v:.4f}" for label, v in kls.items() if v is not None),
        diagnosis.format_evictions(loaded, trace, labels, timelines, args.top, head_scores),
    ]
    text = "\n".join(out)
    print(text)
    (run_dir / "diagnosis.md").write_text("```\n" + text + "\n```\n")
    thinking = range(len(trace.prompt_ids), len(trace.prompt_ids) + trace.answer_start - len(loaded.think_end_ids))
    payload = {
        "ranking": ranking,
        "worst": {"budget": budget, "trace": name, "kl_answer": kls},
        "retained_mass": {t.label: diagnosis.retained_mass(labels, t, thinking) for t in timelines},
        "compressions": {t.label: t.compression_tokens for t in timelines},
    }
    (run_dir / "diagnosis.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
