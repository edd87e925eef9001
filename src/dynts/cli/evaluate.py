"""`dynts eval`, `report`, `regrade`: benchmarks through the engine into a resumable run directory."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

from dynts.cli.args import (
    add_data_dir_flag,
    add_model_flags,
    add_policy_flags,
    add_ray_flags,
    add_sampling_flags,
    engine_spec_from_args,
    existing_run,
)
from dynts.cli.execution import open_executor
from dynts.config import PAPER_MAX_NEW_TOKENS, PAPER_SAMPLES, parse_names


def register(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="run benchmarks and report Pass@1 (avg@k, with its 95%% interval), pass@k, maj@k, TPS, KV memory, "
        "generated lengths and truncation",
    )
    ev.add_argument(
        "--datasets",
        default="demo",
        help="comma-separated: aime24, aime25, amc23, gpqa_d, math500, gaokao2023en, gsm8k, demo "
        "(default: demo, a built-in arithmetic set)",
    )
    ev.add_argument(
        "--samples",
        type=int,
        default=PAPER_SAMPLES,
        help=f"samples per problem; Pass@1 = avg@k (default {PAPER_SAMPLES})",
    )
    ev.add_argument("--limit", type=int, default=None, help="first N problems of each dataset")
    add_data_dir_flag(ev)
    ev.add_argument(
        "--out",
        required=True,
        help="run directory: run.json, samples.jsonl, metrics.json, report.md; rerunning the same command resumes",
    )
    add_model_flags(ev)
    add_policy_flags(ev)
    add_sampling_flags(ev, max_new_tokens=PAPER_MAX_NEW_TOKENS)
    add_ray_flags(ev)
    ev.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="recompute and print the metrics of a run directory")
    rep.add_argument("out", help="run directory written by dynts eval")
    rep.set_defaults(func=cmd_report)
    reg = sub.add_parser("regrade", help="re-grade the stored responses of a run with the current grader")
    reg.add_argument("out", help="run directory written by dynts eval")
    reg.set_defaults(func=cmd_regrade)


def cmd_eval(args) -> int:
    from dynts.harness.datasets import load_dataset
    from dynts.harness.evaluate import EvalPlan, run_eval
    from dynts.harness.report import REPORT_FILE, format_table
    from dynts.harness.store import SAMPLES_FILE

    datasets = parse_names(args.datasets, "--datasets")
    plan = EvalPlan(datasets=datasets, samples=args.samples, limit=args.limit, data_dir=args.data_dir)
    for name in datasets:  # unknown names and missing files fail before the model loads
        load_dataset(name, data_dir=args.data_dir, limit=1)
    spec = engine_spec_from_args(args)
    with closing(open_executor(args, args.model, args.dtype)) as executor:
        metrics = run_eval(spec, plan, args.out, executor=executor)
    print(format_table(metrics))
    print(f"\nresults: {Path(args.out) / SAMPLES_FILE}  report: {Path(args.out) / REPORT_FILE}")
    return 0


def cmd_report(args) -> int:
    from dynts.harness.report import format_table, write_report

    print(format_table(write_report(existing_run(args.out))))
    return 0


def cmd_regrade(args) -> int:
    from dynts.harness.report import format_table, regrade

    print(format_table(regrade(existing_run(args.out))))
    return 0
