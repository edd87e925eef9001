"""`dynts collect`, `label`, `train`, `head`: the importance-predictor pipeline."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

from dynts.cli.args import (
    add_data_dir_flag,
    add_device_flags,
    add_model_flags,
    add_ray_flags,
    add_sampling_flags,
    engine_spec_from_args,
    existing_run,
)
from dynts.cli.execution import open_executor
from dynts.config import DEFAULT_BAND, PAPER_MAX_NEW_TOKENS, parse_widths
from dynts.errors import DynTSError


def register(sub) -> None:
    col = sub.add_parser(
        "collect",
        help="generate reasoning traces with the full cache, graded and stored "
        "resumably, for training an importance head",
    )
    col.add_argument("--dataset", required=True, help="e.g. gsm8k (train split by default), math_train")
    col.add_argument("--split", default=None, help="dataset split (default: train for gsm8k)")
    col.add_argument("--samples", type=int, default=1, help="traces per problem (default 1)")
    col.add_argument("--limit", type=int, default=None, help="first N problems")
    col.add_argument(
        "--correct-only",
        action="store_true",
        help="label only the first correct trace of each problem (paper); off for tiny models",
    )
    add_data_dir_flag(col)
    col.add_argument(
        "--from-solutions",
        action="store_true",
        help="do not generate: teacher-force the dataset's reference solutions (GSM8K, MATH) as thinking, "
        "closed by </think> and a short answer restating the final result (traces whose labels mean something)",
    )
    col.add_argument(
        "--problems-per-trace",
        default="1",
        help="with --from-solutions: N or LOW:HIGH problems per trace (drawn per trace); several problems go "
        "in the thinking under a one-line instruction and the answer restates every final answer (default 1)",
    )
    col.add_argument(
        "--solution-styles",
        default="plain",
        help="with --from-solutions: comma-separated GSM8K solution styles drawn per problem: plain (The answer is "
        "N.), boxed (The answer is $\\boxed{N}$.), latex (calculations in inline TeX, closed by \\boxed{N} as in "
        "MATH) (default plain)",
    )
    col.add_argument("--out", required=True, help="trace directory (rerunning resumes)")
    add_model_flags(col)
    add_sampling_flags(col, max_new_tokens=PAPER_MAX_NEW_TOKENS)
    add_ray_flags(col)
    col.set_defaults(func=cmd_collect)

    lab = sub.add_parser("label", help="label the thinking tokens of collected traces by answer attention")
    lab.add_argument("dir", help="trace directory written by dynts collect; labels go to DIR/labels/")
    lab.add_argument("--model", default=None, help="must be the model that wrote the traces (default: that model)")
    add_device_flags(lab, dtype_default="fp32")
    lab.add_argument("--shard-size", type=int, default=64, help="traces per safetensors shard (default 64)")
    add_ray_flags(lab)
    lab.set_defaults(func=cmd_label)

    tr = sub.add_parser("train", help="fit an importance head on labelled traces (the LLM stays frozen)")
    tr.add_argument("dir", help="trace directory labelled by dynts label")
    tr.add_argument("--out", required=True, help="head directory: head.safetensors + head.json")
    tr.add_argument("--hidden", default="8192,2048", help="hidden layer widths (default 8192,2048, the paper's)")
    tr.add_argument("--epochs", type=int, default=15, help="default 15")
    tr.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    tr.add_argument(
        "--transform",
        default="scale:10000",
        help="label transform: scale:S (y = S x), pow:P (y = 10 x^P / P) or rank:S (y = S x the label's rank "
        "quantile within its trace) (default scale:10000)",
    )
    tr.add_argument(
        "--band",
        default=DEFAULT_BAND,
        help="transformed labels that get loss weight 5: quantile:LO[:HI] of the training labels, value:LO:HI "
        f"(value:4:5 is the paper's band, sized for 10k-token traces) or none (default {DEFAULT_BAND})",
    )
    tr.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm, 0 = off (default 1.0)")
    tr.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="HEAD",
        help="also evaluate this head on the same held-out traces ('shipped' = the shipped head); repeatable",
    )
    tr.add_argument("--retention", type=float, default=0.4, help="r for the reported top-k recall (default 0.4)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None)
    tr.set_defaults(func=cmd_train)

    head = sub.add_parser("head", help="inspect importance heads, or import one from the reference pipeline")
    head_sub = head.add_subparsers(dest="head_command", required=True, metavar="ACTION")
    show = head_sub.add_parser("show", help="print a head's JSON config and metrics (default: the shipped head)")
    show.add_argument("path", nargs="?", default=None, help="head directory or file")
    show.set_defaults(func=cmd_head_show)
    imp = head_sub.add_parser(
        "import",
        help="convert the importance predictor (is_head.*) saved inside a model checkpoint by the method's "
        "reference training code into a head directory",
        description="Read the predictor the reference pipeline trains inside the model (is_head.0/2/4.weight: "
        "bias-free Linear layers, each followed by a Softplus) from a transformers checkpoint directory "
        "(safetensors shards + model.safetensors.index.json, or one model.safetensors) and write "
        "head.safetensors + head.json, recording the base model's hidden size and name. Nothing is written "
        "when the directory holds no such predictor, its shapes do not chain, or a shard cannot be read.",
    )
    imp.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="the model checkpoint directory")
    imp.add_argument("--out", required=True, help="new head directory (head.safetensors + head.json)")
    imp.add_argument(
        "--base-model",
        default=None,
        help="the base model's name to record (default: config.json's _name_or_path, else the directory's name)",
    )
    imp.set_defaults(func=cmd_head_import)


def cmd_collect(args) -> int:
    import argparse

    from dynts.harness.datasets import load_dataset
    from dynts.harness.evaluate import EvalPlan, run_eval
    from dynts.harness.report import format_table
    from dynts.harness.store import SAMPLES_FILE

    split = args.split or ("train" if args.dataset in ("gsm8k",) else None)
    if args.from_solutions:
        return collect_from_solutions(args, split)
    plan = EvalPlan(
        datasets=[args.dataset], samples=args.samples, limit=args.limit, data_dir=args.data_dir, split=split
    )
    load_dataset(args.dataset, data_dir=args.data_dir, limit=1, split=split)
    # traces are generated with the whole cache: the engine settings of the flags with policy full, no frame
    full_cache = {"policy": "full", "head": None, "policy_opt": [], "budget": None, "window": None, "ratio": None}
    spec = engine_spec_from_args(argparse.Namespace(**{**vars(args), **full_cache}))
    with closing(open_executor(args, args.model, args.dtype)) as executor:
        metrics = run_eval(
            spec,
            plan,
            args.out,
            executor=executor,
            extra_manifest={"purpose": "traces", "correct_only": args.correct_only},
        )
    print(format_table(metrics))
    print(f"\ntraces: {Path(args.out) / SAMPLES_FILE}; next: dynts label {args.out}")
    return 0


def collect_from_solutions(args, split: str | None) -> int:
    from dynts.harness.datasets import load_dataset
    from dynts.models.loading import load_model
    from dynts.predictor.solution_traces import TraceLayout, parse_per_trace, solution_traces, write_solution_traces

    if args.ray is not None:
        raise DynTSError("--from-solutions only tokenizes: it runs here, without --ray")
    if args.samples != 1:
        raise DynTSError("--from-solutions writes one teacher-forced trace per group of problems: --samples must be 1")
    styles = tuple(x.strip() for x in args.solution_styles.split(",") if x.strip())
    layout = TraceLayout(per_trace=parse_per_trace(args.problems_per_trace), seed=args.seed, styles=styles)
    problems = load_dataset(args.dataset, data_dir=args.data_dir, limit=args.limit, split=split)
    if not any(p.solution for p in problems):
        raise DynTSError(f"dataset {args.dataset!r} carries no reference solutions: collect without --from-solutions")
    loaded = load_model(args.model, device="cpu", dtype=args.dtype)
    traces = solution_traces(loaded, problems, layout)
    new = write_solution_traces(
        loaded, traces, args.out, layout, {"split": split, "limit": args.limit, "data_dir": args.data_dir}
    )
    tokens = sum(t.length for t in traces)
    used = sum(len(t.problems) for t in traces)
    print(
        f"{len(traces)} teacher-forced traces ({new} new) from {used} of {len(problems)} problems, "
        f"{tokens} tokens (mean {tokens / max(len(traces), 1):.0f}) in {args.out}; next: dynts label {args.out}"
    )
    return 0


def cmd_label(args) -> int:
    from dynts.harness.store import read_manifest
    from dynts.predictor.labels import label_store

    run = existing_run(args.dir)
    if args.shard_size < 1:
        raise DynTSError(f"--shard-size must be at least 1, got {args.shard_size}")
    model = args.model or read_manifest(run).get("model")
    with closing(open_executor(args, model, args.dtype or "fp32")) as executor:
        index = label_store(None, run, shard_size=args.shard_size, executor=executor)
    print(
        f"labelled {index['traces']} traces ({index['tokens']} tokens, {index['skipped']} skipped) "
        f"into {run / 'labels'}; next: dynts train {args.dir} --out HEAD"
    )
    return 0


def cmd_train(args) -> int:
    from dynts.predictor.train import TrainConfig, train_head

    config = TrainConfig(
        hidden=parse_widths(args.hidden, "--hidden"),
        epochs=args.epochs,
        lr=args.lr,
        transform=args.transform,
        band=args.band,
        clip_norm=args.clip or None,
        retention=args.retention,
        seed=args.seed,
        device=args.device,
    )
    compare = {}
    for path in args.compare:
        if path == "shipped":
            from dynts.models.importance_head import shipped_head_path
            from dynts.predictor.labels import label_set_model

            model = label_set_model(args.dir)
            shipped = shipped_head_path(model) if model else None
            if shipped is None:
                raise DynTSError("--compare shipped: no head ships for the model of these labels")
            compare["shipped"] = shipped
        else:
            compare[path] = path
    metrics = train_head(existing_run(args.dir), args.out, config, compare=compare)
    print(f"head written to {args.out}")
    print(heldout_table(metrics))
    return 0


def heldout_table(metrics: dict) -> str:
    """Held-out ranking figures: the head, recency, the attention reference and any compared heads."""
    from dynts.harness.tables import fixed, render_table

    columns = {"head": metrics, "recency": metrics.get("baseline_recency") or {}}
    columns["attention"] = metrics.get("baseline_attention") or {}
    columns.update(metrics.get("compared") or {})
    rows = [
        [key, *(fixed(column.get(key), 3) for column in columns.values())]
        for key in ("spearman", "kendall", "topk_recall")
    ]
    return render_table([f"held-out (r={metrics.get('retention')})", *columns], rows)


def cmd_head_show(args) -> int:
    from dynts.models.importance_head import CONFIG_FILE, shipped_head_path
    from dynts.models.loading import EMBEDDED_MODEL

    path = Path(args.path) if args.path else shipped_head_path(EMBEDDED_MODEL)
    if path is None:
        raise DynTSError(f"no head ships for {EMBEDDED_MODEL}; pass a checkpoint path")
    config = path / CONFIG_FILE if path.is_dir() else path.parent / CONFIG_FILE
    if not config.is_file():
        raise DynTSError(f"no importance head at {path} (expected {CONFIG_FILE})")
    try:
        print(json.dumps(json.loads(config.read_text()), indent=2))
    except ValueError as exc:
        raise DynTSError(f"{config} is not valid JSON: {exc}") from None
    return 0


def cmd_head_import(args) -> int:
    from dynts.predictor.head_import import import_reference_head, save_imported_head

    imported = import_reference_head(args.checkpoint, base_model=args.base_model)
    path = save_imported_head(imported, args.out)
    config = imported.head.config
    widths = " -> ".join(str(w) for w in (config.hidden_size, *config.layers, 1))
    print(f"imported {len(imported.tensors)} layers ({widths}, Softplus after each) for base model {config.base_model}")
    print(f"head written to {path}; use it with --policy dynts --head {path}")
    return 0
