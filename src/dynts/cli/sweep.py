"""`dynts sweep` and `dynts plot`: register(subparsers) adds both subcommands to the dynts parser."""

from __future__ import annotations

import argparse

from dynts.cli.args import (
    add_data_dir_flag,
    add_model_flags,
    add_policy_opt_flag,
    add_ray_flags,
    add_sampling_flags,
    sampling_from_args,
)
from dynts.config import (
    FIGURE_KINDS,
    PAPER_MAX_NEW_TOKENS,
    PAPER_RATIO,
    PAPER_SAMPLES,
    PAPER_WINDOW,
    parse_float_list,
    parse_int_list,
    parse_names,
)

PAPER_DATASETS = "aime24,aime25,amc23,gpqa_d"
PAPER_BUDGETS = "2500:5000:500"

# The grid `dynts sweep` runs when a flag is not given. The embedded model gets a small demo grid that
# finishes on a CPU in minutes; any other model gets the paper's grid.
DEMO_DEFAULTS = {
    "policies": "full,window,rkv",
    "datasets": "demo",
    "budgets": "96:128:16",
    "windows": "16",
    "ratios": "0.75",
    "samples": 2,
    "limit": 4,
    "max_new_tokens": 128,
}


def paper_defaults() -> dict:
    return {
        "policies": "full,rkv",
        "datasets": PAPER_DATASETS,
        "budgets": PAPER_BUDGETS,
        "windows": str(PAPER_WINDOW),
        "ratios": str(PAPER_RATIO),
        "samples": PAPER_SAMPLES,
        "limit": None,
        "max_new_tokens": PAPER_MAX_NEW_TOKENS,
    }


def sweep_defaults(model: str, head: str | None) -> dict:
    """Defaults for the flags left out: the demo grid for the embedded model, the paper's grid otherwise.

    dynts joins the default policies when an importance head is available (--head, or one shipped for the model).
    """
    from dynts.models.importance_head import shipped_head_path
    from dynts.models.loading import EMBEDDED_MODEL

    defaults = dict(DEMO_DEFAULTS) if model == EMBEDDED_MODEL else paper_defaults()
    if head is not None or shipped_head_path(model) is not None:
        first, *rest = defaults["policies"].split(",")
        defaults["policies"] = ",".join([first, "dynts", *rest])
    return defaults


def register(subparsers) -> None:
    """Add `sweep` and `plot` to the dynts subcommands."""
    from dynts.policies import POLICY_NAMES

    sw = subparsers.add_parser(
        "sweep",
        help="run a policy x budget x window x ratio grid (resumable) and write SWEEP/summary.csv",
        description="Run every cell of the grid through the evaluation harness into SWEEP/cells/<cell>/, skip "
        "finished cells, and write SWEEP/summary.csv. Flags left out take the demo grid for the embedded model "
        f"({', '.join(f'{k}={v}' for k, v in DEMO_DEFAULTS.items())}) and the paper's grid for any other model "
        f"(policies=full,rkv, datasets={PAPER_DATASETS}, budgets={PAPER_BUDGETS}, windows={PAPER_WINDOW}, "
        f"ratios={PAPER_RATIO}, samples={PAPER_SAMPLES}, max-new-tokens={PAPER_MAX_NEW_TOKENS}); dynts joins the "
        "default policies when an importance head is available.",
    )
    grid = sw.add_argument_group("grid")
    grid.add_argument(
        "--policies",
        default=None,
        help=f"comma-separated from: {', '.join(POLICY_NAMES)}; 'full' runs once, budget-independent; "
        "NAME:KEY=VALUE sets a policy option (e.g. h2o:scope=shared)",
    )
    add_policy_opt_flag(grid, "every policy of the grid that has KEY")
    grid.add_argument(
        "--budgets",
        default=None,
        help="KV budgets B: comma list and/or inclusive ranges start:stop:step, e.g. 2500:5000:500",
    )
    grid.add_argument("--windows", default=None, help="windows W, same syntax (e.g. 1000,2000)")
    grid.add_argument("--ratios", default=None, help="ratios r, same syntax (e.g. 0.3,0.4 or 0.2:0.5:0.1)")
    grid.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave out cells that cannot run (W >= B, prompt does not fit, ...) instead of failing",
    )
    grid.add_argument(
        "--head", default=None, help="importance head for the dynts policies (default: the head shipped for the model)"
    )
    ev = sw.add_argument_group("evaluation")
    ev.add_argument("--datasets", default=None, help="comma-separated benchmark names (see dynts eval)")
    ev.add_argument("--samples", type=int, default=None, help="samples per problem; Pass@1 = avg@k")
    ev.add_argument("--limit", type=int, default=None, help="first N problems of each dataset")
    add_data_dir_flag(ev)
    ev.add_argument("--out", required=True, help="sweep directory; rerunning resumes, a different grid extends it")
    ev.add_argument(
        "--trace-steps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record a per-step trace (steps.jsonl) of a fixed probe in each cell for the steps figure (default: on)",
    )
    ev.add_argument(
        "--probe-tokens",
        type=int,
        default=None,
        help="tokens the probe decodes, EOS ignored (default: min(max-new-tokens, 2 x largest budget))",
    )
    ev.add_argument("--probe-batch", type=int, default=None, help="sequences the probe decodes together (default 1)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_flags(sw)
    add_sampling_flags(sw, max_new_tokens=None)
    for action in sw._actions:
        if action.dest == "max_new_tokens":
            action.help = f"default: 128 for the embedded model's demo grid, else {PAPER_MAX_NEW_TOKENS}"
    add_ray_flags(sw)
    sw.set_defaults(func=cmd_sweep)

    pl = subparsers.add_parser("plot", help="draw the paper's figures (PNG + PDF + sidecar CSV) from sweep directories")
    pl.add_argument("sweeps", nargs="+", metavar="SWEEP", help="sweep directories written by dynts sweep")
    pl.add_argument(
        "--kind",
        default=None,
        help=f"comma-separated from {', '.join(FIGURE_KINDS)} (default: every kind the data supports)",
    )
    pl.add_argument("--out", default=None, help="figure directory (default: SWEEP/figures of the first SWEEP)")
    pl.add_argument(
        "--window", type=int, default=None, help="use cells with this W (budget/methods/steps/lengths figures)"
    )
    pl.add_argument(
        "--ratio", type=float, default=None, help="use cells with this r (budget/methods/steps/lengths figures)"
    )
    pl.add_argument("--budget", type=int, default=None, help="the budget of the methods/steps/heatmap/lengths figures")
    pl.set_defaults(func=cmd_plot)


def spec_from_args(args):
    """Build and check a SweepSpec from parsed `dynts sweep` flags (no model is loaded)."""
    from dynts.experiments.sweep import SweepSpec
    from dynts.policies.options import parse_assignments

    defaults = sweep_defaults(args.model, args.head)
    given = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    policies = parse_names(given("policies"), "--policies")
    budgets = parse_int_list(given("budgets"), "--budgets")
    windows = parse_int_list(given("windows"), "--windows")
    ratios = parse_float_list(given("ratios"), "--ratios")
    datasets = parse_names(given("datasets"), "--datasets")
    limit = args.limit if args.limit is not None else defaults["limit"]
    sampling = sampling_from_args(args, max_new_tokens=given("max_new_tokens"))
    return SweepSpec(
        model=args.model,
        policies=policies,
        budgets=budgets,
        windows=windows,
        ratios=ratios,
        datasets=datasets,
        samples=given("samples"),
        limit=limit,
        data_dir=args.data_dir,
        sampling=sampling,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        head=args.head,
        trace_steps=args.trace_steps,
        probe_tokens=args.probe_tokens,
        probe_batch=args.probe_batch,
        skip_invalid=args.skip_invalid,
        fast=args.fast,
        batching=args.batching,
        kernel=args.kernel,
        graphs=args.graphs,
        compile=args.compile,
        policy_options=parse_assignments(args.policy_opt),
    )


def cmd_sweep(args) -> int:
    from dynts.experiments.sweep import run_sweep
    from dynts.runtime.ray_executor import ray_config_from_args

    spec = spec_from_args(args)
    spec.cells()  # grid mistakes before anything else
    config = ray_config_from_args(args)
    make_executor = None
    if config is not None:  # the units of every cell share one pool of workers

        def make_executor():
            from dynts.runtime.ray_executor import ModelArgs, RayExecutor

            return RayExecutor(config, ModelArgs(spec.model, spec.device, spec.dtype))

    result = run_sweep(spec, args.out, progress=not args.quiet, make_executor=make_executor)
    print(
        f"sweep {result.out}: {len(result.cells)} cells ({len(result.ran)} run, {len(result.skipped_done)} "
        f"already finished)"
    )
    for line in result.skipped_invalid:
        print(f"  left out: {line}")
    print(f"summary: {result.summary}; next: dynts plot {result.out}")
    return 0


def cmd_plot(args) -> int:
    from dynts.experiments.plots import plot_sweeps

    kinds = None
    if args.kind is not None:
        kinds = parse_names(args.kind, "--kind")
    written = plot_sweeps(
        args.sweeps, out_dir=args.out, kinds=kinds, window=args.window, ratio=args.ratio, budget=args.budget
    )
    for kind, paths in written.items():
        print(f"{kind}: {', '.join(str(p) for p in paths)}")
    return 0
