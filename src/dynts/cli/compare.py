"""`dynts compare`: runs (or sweep cells) side by side, each against the first, on the samples they share."""

from __future__ import annotations

from dynts.config import DEFAULT_PERMUTATIONS, DEFAULT_RESAMPLES, DEFAULT_SEED


def register(sub) -> None:
    cmp = sub.add_parser(
        "compare",
        help="compare runs against the first: Pass@1 difference (paired bootstrap interval, permutation p), "
        "TPS, length and truncation",
        description="Compare run or sweep-cell directories against the first one (the baseline) on the problems "
        "and sample indices every run holds: Pass@1 with its interval, the difference to the baseline with a "
        "paired bootstrap interval and a paired permutation p-value, TPS and its ratio, mean and p90 generated "
        "length and their ratios, and each run's truncation rate (samples stopped by max_new_tokens). What was "
        "left out, and settings that differ, are said in one line.",
    )
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run directories (dynts eval --out, or SWEEP/cells/CELL)")
    cmp.add_argument("--out", default=None, help="also write DIR/compare.json and DIR/compare.md")
    cmp.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"bootstrap seed (default {DEFAULT_SEED})")
    cmp.add_argument(
        "--resamples", type=int, default=DEFAULT_RESAMPLES, help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})"
    )
    cmp.add_argument(
        "--permutations",
        type=int,
        default=DEFAULT_PERMUTATIONS,
        help="random swap patterns of the permutation test when there are too many to enumerate "
        f"(default {DEFAULT_PERMUTATIONS})",
    )
    cmp.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from dynts.harness.compare import compare_runs, describe_runs, format_comparison, write_comparison
    from dynts.harness.uncertainty import BootstrapConfig

    config = BootstrapConfig(resamples=args.resamples, seed=args.seed, permutations=args.permutations)
    comparison = compare_runs(args.runs, config)
    print(describe_runs(comparison))
    if comparison["note"]:
        print(f"note: {comparison['note']}")
    print()
    print(format_comparison(comparison))
    if args.out is not None:
        written = write_comparison(comparison, args.out)
        print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0
