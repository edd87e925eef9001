"""`dynts fidelity`: replay reference traces under each policy and budget; KL and top-1 against the full cache."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from dynts.cli.args import add_data_dir_flag, add_model_flags, add_policy_opt_flag
from dynts.config import FIDELITY_POLICIES, PAPER_RATIO, PAPER_WINDOW_SHARE, paper_window, parse_int_list, parse_names
from dynts.errors import DynTSError

DEFAULT_POLICIES = ",".join(FIDELITY_POLICIES)
# The paper's proportions: W / B = 2000 / 5000 and r = 0.4. A compression then keeps floor(0.4 (B - 0.4 B)), about
# 0.24 B older tokens, which must hold the whole prompt for dynts: 512 is about the smallest budget that holds the
# embedded model's prompts (60-120 tokens; 123 fit), and 1024-token traces compress 2 to 4 times under these.
DEFAULT_BUDGETS = "512,640,768"


def register(sub) -> None:
    fid = sub.add_parser(
        "fidelity",
        help="replay reference traces teacher-forced under each policy and budget and "
        "measure KL(full || policy) and top-1 agreement of next-token distributions",
    )
    fid.add_argument("--traces", default=None, help="trace directory from dynts collect")
    fid.add_argument("--dataset", default=None, help="or: generate reference traces (greedy, full cache) from this")
    add_data_dir_flag(fid)
    fid.add_argument(
        "--limit",
        type=int,
        default=None,
        help="number of traces (default: all; 20 for --dataset); "
        "with --traces, the first N with --min-tokens tokens whose prompts fit every budget",
    )
    fid.add_argument("--min-tokens", type=int, default=1, help="with --traces: skip traces shorter than this")
    fid.add_argument("--max-new-tokens", type=int, default=1024, help="reference trace length for --dataset")
    fid.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help="comma-separated; NAME:KEY=VALUE sets a policy option, so one call can run a policy with several "
        "options, e.g. h2o,h2o:scope=shared (default: every baseline in both scopes, the prompt-protecting "
        f"Window control, and dynts: {DEFAULT_POLICIES})",
    )
    add_policy_opt_flag(fid, "every listed policy that has KEY (e.g. scope=shared)")
    fid.add_argument(
        "--budgets",
        default=DEFAULT_BUDGETS,
        help="budgets, comma-separated and/or ranges start:stop:step "
        f"(default {DEFAULT_BUDGETS}: with the paper's W/B = 0.4 and r = 0.4 a compression keeps floor(r (B - W)), "
        "about 0.24 B, older tokens, which must hold a protected prompt; from "
        "B = 512 up they hold the embedded model's typical prompts (up to 123 tokens; with --traces longer ones "
        "are skipped), and 1024-token traces compress 2-4 times)",
    )
    fid.add_argument(
        "--window",
        type=int,
        default=None,
        help="W in tokens, the same for every budget (default: --window-fraction of each budget)",
    )
    fid.add_argument(
        "--window-fraction",
        type=float,
        default=None,
        help=f"W = floor(F * B) for each budget B, unless --window is given (default {PAPER_WINDOW_SHARE}: the "
        "paper's W/B = 2000/5000)",
    )
    fid.add_argument(
        "--ratio",
        type=float,
        default=PAPER_RATIO,
        help=f"r for every budget (default {PAPER_RATIO}, the paper's for R1-Qwen)",
    )
    fid.add_argument("--head", default=None, help="importance head for dynts (default: the shipped one)")
    fid.add_argument("--out", required=True, help="writes fidelity.json, fidelity.md, fidelity_kl.png/pdf/csv")
    add_model_flags(fid)
    fid.set_defaults(func=cmd_fidelity)


def cmd_fidelity(args) -> int:
    from dynts.experiments import fidelity
    from dynts.models.loading import load_model
    from dynts.policies.options import parse_assignments
    from dynts.policies.registry import check_common_options, resolve_spec

    options = parse_assignments(args.policy_opt)
    policies = parse_names(args.policies, "--policies")
    check_common_options(options, [resolve_spec(p, options)[0] for p in policies])  # mistakes before the load
    budgets = parse_int_list(args.budgets, "--budgets")
    windows = windows_for(budgets, args.window, args.window_fraction)
    if bool(args.traces) == bool(args.dataset):
        raise DynTSError("give exactly one of --traces DIR (from dynts collect) or --dataset NAME")
    if args.traces and not Path(args.traces).is_dir():
        raise DynTSError(f"--traces {args.traces} does not exist")
    if args.min_tokens < 1:
        raise DynTSError(f"--min-tokens must be at least 1, got {args.min_tokens}")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engines = {}
    for budget, window in windows.items():  # W may differ per budget: one call per budget
        engines.update(
            fidelity.build_engines(
                loaded, policies, [budget], window, args.ratio, head_path=args.head, policy_options=options
            )
        )
    labels = list(dict.fromkeys(label for label, _ in engines))  # in the order of --policies
    engines = dict(sorted(engines.items(), key=lambda e: (labels.index(e[0][0]), e[0][1].budget if e[0][1] else 0)))
    if args.traces:
        stored = fidelity.traces_from_store(args.traces, loaded)
        long_enough = [t for t in stored if len(t.token_ids) >= args.min_tokens]
        fit = fidelity.fitting(engines, long_enough)
        traces = fit[: args.limit]
        skipped = len(stored) - len(long_enough), len(long_enough) - len(fit)
        if not traces:
            raise DynTSError(
                f"no trace in {args.traces} has {args.min_tokens}+ tokens and a prompt that fits every "
                f"budget ({skipped[0]} too short, {skipped[1]} with prompts too long)"
            )
        if any(skipped):
            print(
                f"skipping {skipped[0]} traces under {args.min_tokens} tokens and {skipped[1]} whose prompts do "
                f"not fit the smallest budget",
                file=sys.stderr,
            )
    else:
        traces = fidelity.traces_from_dataset(
            loaded, args.dataset, args.limit or 20, args.max_new_tokens, data_dir=args.data_dir, engines=engines
        )
    records = fidelity.measure_engines(loaded, traces, engines)
    manifest = {
        "model": loaded.name,
        "policies": policies,
        "policy_options": options,
        "budgets": budgets,
        "window": list(windows.values()),
        "window_fraction": None if args.window is not None else args.window_fraction or PAPER_WINDOW_SHARE,
        "ratio": args.ratio,
        "traces": args.traces or args.dataset,
        "n_traces": len(traces),
        "mean_trace_tokens": sum(len(t.token_ids) for t in traces) / len(traces),
        "mean_prompt_tokens": sum(len(t.prompt_ids) for t in traces) / len(traces),
    }
    path = fidelity.write_outputs(records, args.out, manifest)
    print(fidelity.format_table(records))
    print(f"\n{path}")
    return 0


def windows_for(budgets: list[int], window: int | None, fraction: float | None) -> dict[int, int]:
    """W for each budget: --window for all, or floor(fraction * B) (the paper's 0.4 by default)."""
    if window is not None and fraction is not None:
        raise DynTSError("give --window (tokens) or --window-fraction (share of each budget), not both")
    if window is not None:
        return dict.fromkeys(budgets, window)
    if fraction is None:
        return {b: paper_window(b) for b in budgets}
    if not 0 < fraction < 1:
        raise DynTSError(f"--window-fraction must be in (0, 1), got {fraction}")
    return {b: math.floor(fraction * b + 1e-9) for b in budgets}
