"""`dynts fidelity`: replay reference traces under each policy and budget; KL and top-1 against the full cache."""

from __future__ import annotations

import sys
from pathlib import Path

from dynts.cli.args import add_model_flags, add_policy_opt_flag, parse_int_list
from dynts.errors import DynTSError

DEFAULT_POLICIES = "full,window,streaming,sepllm,h2o,snapkv,rkv,dynts"


def register(sub) -> None:
    fid = sub.add_parser(
        "fidelity",
        help="replay reference traces teacher-forced under each policy and budget and "
        "measure KL(full || policy) and top-1 agreement of next-token distributions",
    )
    fid.add_argument("--traces", default=None, help="trace directory from dynts collect")
    fid.add_argument("--dataset", default=None, help="or: generate reference traces (greedy, full cache) from this")
    fid.add_argument("--data-dir", default=None, help="dataset directory (default: $DYNTS_DATA_DIR)")
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
        help=f"comma-separated; NAME:KEY=VALUE sets a policy option (default {DEFAULT_POLICIES})",
    )
    add_policy_opt_flag(fid, "every listed policy that has KEY")
    fid.add_argument("--budgets", default="128,256,512", help="comma-separated budgets (default 128,256,512)")
    fid.add_argument("--window", type=int, default=32, help="W for every budget (default 32)")
    fid.add_argument("--ratio", type=float, default=0.5, help="r for every budget (default 0.5)")
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
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    check_common_options(options, [resolve_spec(p, options)[0] for p in policies])  # mistakes before the load
    budgets = parse_int_list(args.budgets, "--budgets")
    if bool(args.traces) == bool(args.dataset):
        raise DynTSError("give exactly one of --traces DIR (from dynts collect) or --dataset NAME")
    if args.traces and not Path(args.traces).is_dir():
        raise DynTSError(f"--traces {args.traces} does not exist")
    if args.min_tokens < 1:
        raise DynTSError(f"--min-tokens must be at least 1, got {args.min_tokens}")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engines = fidelity.build_engines(
        loaded, policies, budgets, args.window, args.ratio, head_path=args.head, policy_options=options
    )
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
            loaded, args.dataset, args.limit or 20, args.max_new_tokens, data_dir=args.data_dir
        )
        fidelity.check_traces(engines, traces)
    records = fidelity.measure_engines(loaded, traces, engines)
    manifest = {
        "model": loaded.name,
        "policies": policies,
        "policy_options": options,
        "budgets": budgets,
        "window": args.window,
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
