"""DynTS against the baselines in the paper's proportions: W/B = 0.4, r = 0.4, a prompt that is at most 20% of what a
compression keeps, and at least 3 compressions per trace (src/dynts/experiments/fidelity_paper.py says why).

    python benchmarks/fidelity_paper.py [--dataset gsm8k] [--split train] [--limit 24] [--out runs/fidelity-paper]
                                        [--budgets 400,500] [--policies LIST] [--head HEAD]

Builds reference traces from the dataset (teacher-forced reference solutions where it has them, else the model's
own greedy traces) into OUT/traces, replays each under every policy and budget, appends per-trace results to
OUT/per_trace.jsonl (a rerun resumes), and writes OUT/fidelity.json (one record per policy, scope and budget:
policy, scope, budget, kl_answer, kl_after, top1_answer, top1_after, ...), OUT/fidelity.md and a KL plot, then
prints the table and whether DynTS has the lowest answer-span KL of the shared-scope baselines at every budget.
Then the intervals (OUT/intervals.json, OUT/intervals.md; src/dynts/experiments/fidelity_intervals.py): for DynTS
against every other policy at each budget the paired bootstrap difference of answer-span KL over traces, on how
many traces DynTS is lower and a verdict ("lower", "higher", "not distinguishable"), and each policy's worst trace
and its count of traces over twice the control's KL. A progress bar (weighted by trace tokens) estimates the time
left. benchmarks/fidelity_intervals.py recomputes them, also across runs on the same traces.
Runtime on the embedded model is about (traces x policies x tokens after the first compression) / 210 tokens/s
per core: a 930-token trace takes about 50 s of one core for the 11 compressing policies at two budgets, so the
default 24 traces take about 20 min on one core (measured: 12 min on the 2-core CPU). Not a test: the full run
wants a quiet machine.

--regime long (src/dynts/experiments/long_regime.py): 6 GSM8K-test traces of 2.5-2.7k tokens (13-16 problems
each; 11-12 compressions at B=512, 7 at B=768), 15 compressing policies at 2 budgets: about 60k token-forwards
per trace, so by the rate above about 29 min on one core, 15-20 min on the 2-core CPU. That is an estimate from
the measured rate, not a measured run: in the session that wrote it the machine ran at load 13-15 (about seven
agents on two cores) and no full long run could finish.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

LONG_LIMIT = 6  # experiments/long_regime.py LONG_LIMIT (read here without importing the package for --help)


def main(argv=None) -> int:
    from dynts.config import parse_int_list
    from dynts.errors import DynTSError
    from dynts.experiments import fidelity_paper as paper

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--regime",
        choices=["default", "long"],
        default="default",
        help="long: traces of 2.5k+ tokens, >= 10 compressions at B=512, budgets 512,768, dynts's ablations too "
        "(src/dynts/experiments/long_regime.py)",
    )
    p.add_argument("--dataset", default=None, help="any registered math dataset (default gsm8k)")
    p.add_argument(
        "--split", default=None, help="default: train where the dataset has one (long regime: test), else its default"
    )
    p.add_argument(
        "--limit", type=int, default=None, help=f"reference traces to measure (default 24, long {LONG_LIMIT}; >= 4)"
    )
    p.add_argument("--out", default=None, help="output directory (default runs/fidelity-paper[-long])")
    p.add_argument("--budgets", default=None, help="default 400,500 (multiples of 5); long: 512,768")
    p.add_argument(
        "--policies",
        default=None,
        help="comma-separated, NAME:KEY=VALUE for options (default: full, every baseline in each scope, dynts, and "
        f"the prompt-protecting Window {paper.PROMPT_WINDOW}: " + ",".join(paper.default_policies()) + ")",
    )
    p.add_argument(
        "--head",
        default=None,
        help="importance head for dynts (default: the shipped one); dynts:head=PATH in --policies gives one policy its "
        "own, to compare heads in one run",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: $DYNTS_DATA_DIR, else the hub)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        return run(args, paper, parse_int_list)
    except DynTSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args, paper, parse_int_list) -> int:
    from dynts.errors import DynTSError
    from dynts.experiments import fidelity_diagnosis as diagnosis
    from dynts.experiments import fidelity_intervals as intervals
    from dynts.experiments import long_regime as long
    from dynts.experiments.fidelity import build_engines, check_traces
    from dynts.harness.datasets import REGISTRY, dataset_kind
    from dynts.models.loading import load_model

    is_long = args.regime == "long"
    args.dataset = args.dataset or "gsm8k"
    args.limit = args.limit or (long.LONG_LIMIT if is_long else 24)
    args.out = args.out or ("runs/fidelity-paper-long" if is_long else "runs/fidelity-paper")
    if is_long and args.split is None and args.dataset == long.LONG_DATASET:
        args.split = long.LONG_SPLIT
    if args.limit < paper.MIN_TRACES:
        raise DynTSError(f"--limit must be at least {paper.MIN_TRACES}, got {args.limit}")
    if dataset_kind(args.dataset) != "math":
        raise DynTSError(f"--dataset {args.dataset}: the benchmark runs on math datasets")
    spec = REGISTRY.get(args.dataset)
    split = args.split or ("train" if spec is not None and "train" in spec.files else None)
    budgets = tuple(parse_int_list(args.budgets, "--budgets")) if args.budgets else None
    if is_long:
        frame = long.LongFrame(budgets or long.LONG_BUDGETS)
        policies = paper.policies_from_text(args.policies or ",".join(long.default_policies()))
    else:
        frame = paper.PaperFrame(budgets or paper.DEFAULT_BUDGETS)
        policies = paper.policies_from_text(args.policies)
    out = Path(args.out)
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype="fp32")
    engines = {}  # one window per budget: W = 0.4 B
    for budget in frame.budgets:
        engines.update(
            build_engines(loaded, policies, [budget], frame.window(budget), paper.RATIO, head_path=args.head)
        )
    print(
        "frame: "
        + "; ".join(f"B={d['budget']} W={d['window']} r={d['ratio']} keeps {d['kept']}" for d in frame.describe())
        + f"; prompt <= {frame.max_prompt()} tokens, traces >= {frame.min_length()} tokens",
        file=sys.stderr,
    )
    build = long.build_long_traces if is_long else paper.build_traces
    source = build(loaded, args.dataset, split, args.data_dir, frame, args.limit, out / "traces")
    print(f"reference traces: {source} ({out / 'traces'})", file=sys.stderr)
    keyed = paper.stored_traces(loaded, out / "traces")
    chosen, skipped = paper.select_traces(frame, keyed, args.limit)
    check_traces(engines, [t for _, t in chosen])  # the frame's rules are stricter: this never fires
    for reason, n in skipped.items():
        print(f"skipped {n} traces: {reason}", file=sys.stderr)
    lengths = [len(t.prompt_ids) + len(t.token_ids) for _, t in chosen]
    prompts = [len(t.prompt_ids) for _, t in chosen]
    manifest = {
        "model": loaded.name,
        "dataset": args.dataset,
        "split": split,
        "regime": args.regime,
        "frame": frame.describe(),
        "policies": policies,
        "head": args.head,
        "head_digest": paper.head_digest(engines),
        "traces_source": source,
        "trace_dir": str((out / "traces").resolve()),
        "mean_trace_tokens": sum(lengths) / len(lengths),
        "mean_prompt_tokens": sum(prompts) / len(prompts),
        "compressions_per_trace": {
            str(b): min(frame.compressions(n, b) for n in lengths) for b in frame.budgets
        },  # the fewest, per budget
    }
    prepare = diagnosis.oracle_hook(loaded, engines)  # dynts:scores=oracle gets each trace's labels
    if is_long:
        records = long.run_long(loaded, chosen, engines, out, manifest, prepare=prepare)
    else:
        records = paper.run_benchmark(loaded, chosen, engines, out, manifest, prepare=prepare)
    print(paper.format_table(records))
    print()
    for line in paper.verdict(records):
        print(line)
    per_trace = intervals.select(intervals.read_per_trace(out / paper.PER_TRACE_FILE), [k for k, _ in chosen])
    differences, _, text = intervals.write_report(per_trace, out, paper.control_label())
    print("\n" + text + "\n")
    for line in intervals.summary_lines(differences):
        print(line)
    if is_long:
        print("\n" + (out / "curve.md").read_text().strip("`\n"))
    print(f"\n{out / 'fidelity.json'}  ({len(chosen)} traces, {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
