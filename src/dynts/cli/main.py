"""The `dynts` command line. Every subcommand is a thin layer over the Python API.

User mistakes (DynTSError) print one line `dynts: error: ...` and exit with code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing
from pathlib import Path

from dynts.errors import DynTSError

PAPER_BUDGET, PAPER_WINDOW, PAPER_RATIO = 5000, 2000, 0.4


# --- shared flags ---------------------------------------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m",
                   help="Hugging Face id, local directory, .gguf file, or the embedded 'smollm2-135m' (default)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weights and cache dtype (default: bf16 on CUDA, fp32 on CPU)")


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    from dynts.policies import POLICIES

    g = p.add_argument_group("KV budget")
    g.add_argument("--policy", default="dynts", choices=list(POLICIES), metavar="POLICY",
                   help=f"eviction policy: {', '.join(POLICIES)} (default: dynts)")
    g.add_argument("--budget", type=int, default=PAPER_BUDGET,
                   help=f"B: a sequence compresses when its cache holds B tokens (default {PAPER_BUDGET})")
    g.add_argument("--window", type=int, default=PAPER_WINDOW,
                   help=f"W: most recent tokens always kept; 0 only for the dynts ablation (default {PAPER_WINDOW})")
    g.add_argument("--ratio", type=float, default=PAPER_RATIO,
                   help=f"r: share of the older L-W tokens a compression keeps, in (0, 1] (default {PAPER_RATIO})")
    g.add_argument("--head", default=None,
                   help="importance head checkpoint for dynts policies (default: the head shipped for the model)")


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-p/top-k)")
    g.add_argument("--temperature", type=float, default=0.6, help="default 0.6")
    g.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    g.add_argument("--top-k", type=int, default=20, help="default 20 (0 disables)")
    g.add_argument("--seed", type=int, default=42, help="default 42")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--batch-size", type=int, default=8, help="sequences decoded together (default 8)")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="static fast decode path with CUDA graphs (default: on with CUDA, off on CPU); greedy output "
                   "is the same either way, sampled output differs (counter-based noise)")


def sampling_from_args(args):
    from dynts.config import SamplingConfig

    return SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, max_new_tokens=args.max_new_tokens)


def budget_from_args(args):
    from dynts.config import BudgetConfig
    from dynts.policies import policy_class

    cls = policy_class(args.policy)
    if not cls.compresses:
        return BudgetConfig(None)
    return BudgetConfig(args.budget, args.window, args.ratio, allow_zero_window=cls.allows_zero_window)


def engine_spec_from_args(args):
    """The engine settings of the flags, every one checked, without loading anything."""
    from dynts.runtime.executor import EngineSpec

    budget = budget_from_args(args)
    sampling = sampling_from_args(args)
    if args.batch_size < 1:
        raise DynTSError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.head is not None and not Path(args.head).exists():
        raise DynTSError(f"--head {args.head} does not exist")
    return EngineSpec(args.policy, budget, sampling, args.batch_size, head_path=args.head, fast=args.fast)


def build_engine(args, trace_steps: bool = False, on_step=None):
    """Validate every flag before the (slow) model load, then load and build the engine."""
    from dynts.api import make_engine
    from dynts.models.loading import load_model

    spec = engine_spec_from_args(args)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    return make_engine(loaded, spec.policy, spec.budget, spec.sampling, spec.batch_size, head_path=spec.head_path,
                       trace_steps=trace_steps, on_step=on_step, fast=spec.fast)


# --- where the work runs: here, or on Ray (--ray) ---------------------------------------------------
def add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out on Ray (pip install \"dynts[ray]\")")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray workers; the driver alone writes the results, as a local run does. Without "
                   "ADDRESS: start a local Ray instance; 'auto' or ray://HEAD:10001: join an existing cluster "
                   "(before a positional argument write --ray=ADDRESS)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray workers, each holding one model replica (default 1)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs each worker reserves (default: 1 when CUDA is present and --device is not cpu, else 0)")


def open_executor(args, model: str, dtype: str | None):
    """Check the Ray flags, then start Ray workers (--ray) or load the model here."""
    from dynts.runtime.ray_executor import ray_config_from_args

    config = ray_config_from_args(args)
    if config is None:
        from dynts.runtime.executor import LocalExecutor
        from dynts.models.loading import load_model

        return LocalExecutor(load_model(model, device=args.device, dtype=dtype))
    from dynts.runtime.ray_executor import ModelArgs, RayExecutor

    return RayExecutor(config, ModelArgs(model, args.device, dtype))


# --- generate -------------------------------------------------------------------------------------
def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise DynTSError(f"--prompts-file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompts.append(json.loads(line)["prompt"])
            except (ValueError, KeyError, TypeError):
                raise DynTSError(f"{path}:{number}: expected a JSON object with a 'prompt' field") from None
        else:
            prompts.append(line)
    if not prompts:
        raise DynTSError(f"--prompts-file {path} holds no prompts")
    return prompts


def cmd_generate(args) -> int:
    from tqdm import tqdm

    prompts = read_prompts(args)
    budget_from_args(args), sampling_from_args(args)  # fail before any output
    bar = tqdm(desc="decoding", unit="tok", disable=None, file=sys.stderr, leave=False)
    engine = build_engine(args, on_step=bar.update)
    output = engine.generate(prompts, chat=not args.raw)
    bar.close()
    if args.json:
        for prompt, result in zip(prompts, output.results):
            print(json.dumps({"prompt": prompt, **result.to_dict()}), flush=True)
        return 0
    for i, (prompt, result) in enumerate(zip(prompts, output.results)):
        print(f"=== prompt {i}: {prompt[:70]!r}")
        print(result.text)
        print()
    print(format_stats(output, engine))
    return 0


def format_stats(output, engine) -> str:
    run = output.stats
    budget = engine.budget
    frame = f"B={budget.budget} W={budget.window} r={budget.ratio}" if budget.compresses else "no budget"
    rows = [
        ("policy", f"{engine.policy.name} ({frame})"),
        ("sequences", run.sequences),
        ("generated tokens", run.generated_tokens),
        ("TPS (end to end)", f"{run.tps:.1f}"),
        ("TPS (forward only)", f"{run.tps_forward:.1f}"),
        ("decode time", f"{run.decode_time_s:.2f} s"),
        ("peak KV tokens (batch)", run.peak_kv_tokens),
        ("peak KV memory (batch)", f"{run.peak_kv_bytes / 2**20:.1f} MiB"),
        ("compressions", run.compressions),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- eval / report / regrade ---------------------------------------------------------------------
def cmd_eval(args) -> int:
    from dynts.harness.evaluate import EvalPlan, run_eval
    from dynts.harness.report import format_table

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    plan = EvalPlan(datasets=datasets, samples=args.samples, limit=args.limit, data_dir=args.data_dir)
    from dynts.harness.datasets import load_dataset

    for name in datasets:  # unknown names and missing files fail before the model loads
        load_dataset(name, data_dir=args.data_dir, limit=1)
    spec = engine_spec_from_args(args)
    with closing(open_executor(args, args.model, args.dtype)) as executor:
        metrics = run_eval(spec, plan, args.out, executor=executor)
    print(format_table(metrics))
    print(f"\nresults: {Path(args.out) / 'samples.jsonl'}  report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_report(args) -> int:
    from dynts.harness.report import format_table, write_report

    print(format_table(write_report(_existing_run(args.out))))
    return 0


def cmd_regrade(args) -> int:
    from dynts.harness.report import format_table, regrade

    print(format_table(regrade(_existing_run(args.out))))
    return 0


# --- predictor pipeline ---------------------------------------------------------------------------
def cmd_collect(args) -> int:
    from dynts.harness.evaluate import EvalPlan, run_eval
    from dynts.harness.datasets import load_dataset
    from dynts.harness.report import format_table

    split = args.split or ("train" if args.dataset in ("gsm8k",) else None)
    plan = EvalPlan(datasets=[args.dataset], samples=args.samples, limit=args.limit, data_dir=args.data_dir,
                    split=split)
    load_dataset(args.dataset, data_dir=args.data_dir, limit=1, split=split)
    args.policy, args.head = "full", None  # traces are generated with the whole cache
    spec = engine_spec_from_args(args)
    with closing(open_executor(args, args.model, args.dtype)) as executor:
        metrics = run_eval(spec, plan, args.out, executor=executor,
                           extra_manifest={"purpose": "traces", "correct_only": args.correct_only})
    print(format_table(metrics))
    print(f"\ntraces: {Path(args.out) / 'samples.jsonl'}; next: dynts label {args.out}")
    return 0


def cmd_label(args) -> int:
    from dynts.predictor.labels import label_store
    from dynts.harness.store import read_manifest

    run = _existing_run(args.dir)
    if args.shard_size < 1:
        raise DynTSError(f"--shard-size must be at least 1, got {args.shard_size}")
    model = args.model or read_manifest(run).get("model")
    with closing(open_executor(args, model, args.dtype or "fp32")) as executor:
        index = label_store(None, run, shard_size=args.shard_size, executor=executor)
    print(f"labelled {index['traces']} traces ({index['tokens']} tokens, {index['skipped']} skipped) "
          f"into {run / 'labels'}; next: dynts train {args.dir} --out HEAD")
    return 0


def cmd_train(args) -> int:
    from dynts.predictor.train import TrainConfig, train_head

    try:
        hidden = tuple(int(x) for x in args.hidden.split(",") if x.strip())
    except ValueError:
        raise DynTSError(f"--hidden takes comma-separated layer widths like 8192,2048, got {args.hidden!r}") from None
    config = TrainConfig(hidden=hidden, epochs=args.epochs, lr=args.lr, transform=args.transform,
                         retention=args.retention, seed=args.seed, device=args.device)
    metrics = train_head(_existing_run(args.dir), args.out, config)
    base = metrics.get("baseline_recency", {})
    print(f"head written to {args.out}")
    print(f"{'held-out':<18}{'head':>9}{'recency':>9}")
    for key in ("spearman", "kendall", "topk_recall"):
        mine, theirs = metrics.get(key), base.get(key)
        print(f"{key:<18}{mine if mine is None else f'{mine:.3f}':>9}{theirs if theirs is None else f'{theirs:.3f}':>9}")
    return 0


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


# --- fidelity -------------------------------------------------------------------------------------
def cmd_fidelity(args) -> int:
    from dynts.experiments import fidelity
    from dynts.models.loading import load_model
    from dynts.policies import policy_class

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name in policies:
        policy_class(name)
    budgets = parse_int_list(args.budgets, "--budgets")
    if bool(args.traces) == bool(args.dataset):
        raise DynTSError("give exactly one of --traces DIR (from dynts collect) or --dataset NAME")
    if args.traces and not Path(args.traces).is_dir():
        raise DynTSError(f"--traces {args.traces} does not exist")
    if args.min_tokens < 1:
        raise DynTSError(f"--min-tokens must be at least 1, got {args.min_tokens}")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engines = fidelity.build_engines(loaded, policies, budgets, args.window, args.ratio, head_path=args.head)
    if args.traces:
        stored = fidelity.traces_from_store(args.traces, loaded)
        long_enough = [t for t in stored if len(t.token_ids) >= args.min_tokens]
        fit = fidelity.fitting(engines, long_enough)
        traces = fit[: args.limit]
        skipped = len(stored) - len(long_enough), len(long_enough) - len(fit)
        if not traces:
            raise DynTSError(f"no trace in {args.traces} has {args.min_tokens}+ tokens and a prompt that fits every "
                             f"budget ({skipped[0]} too short, {skipped[1]} with prompts too long)")
        if any(skipped):
            print(f"skipping {skipped[0]} traces under {args.min_tokens} tokens and {skipped[1]} whose prompts do "
                  f"not fit the smallest budget", file=sys.stderr)
    else:
        traces = fidelity.traces_from_dataset(loaded, args.dataset, args.limit or 20, args.max_new_tokens,
                                              data_dir=args.data_dir)
        fidelity.check_traces(engines, traces)
    records = fidelity.measure_engines(loaded, traces, engines)
    manifest = {"model": loaded.name, "policies": policies, "budgets": budgets, "window": args.window,
                "ratio": args.ratio, "traces": args.traces or args.dataset, "n_traces": len(traces),
                "mean_trace_tokens": sum(len(t.token_ids) for t in traces) / len(traces),
                "mean_prompt_tokens": sum(len(t.prompt_ids) for t in traces) / len(traces)}
    path = fidelity.write_outputs(records, args.out, manifest)
    print(fidelity.format_table(records))
    print(f"\n{path}")
    return 0


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DynTSError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise DynTSError(f"{flag} is empty")
    return values


def _existing_run(out: str) -> Path:
    path = Path(out)
    if not (path / "run.json").is_file():
        raise DynTSError(f"{path} is not a dynts run directory (no run.json)")
    return path


# --- parser ---------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """Usage mistakes read like every other user error: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"dynts: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from dynts import __version__

    parser = Parser(prog="dynts", description="Memory-bounded reasoning inference: budgeted KV "
                                     "cache decoding with DynTS and baseline eviction policies.")
    parser.add_argument("--version", action="version", version=f"dynts {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="decode prompts under a KV budget and print texts and statistics")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (the model's chat template is applied)")
    src.add_argument("--prompts-file", help="one prompt per line, or a .jsonl file with a 'prompt' field per line")
    gen.add_argument("--raw", action="store_true", help="feed prompts as they are, without the chat template")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt: text, token_ids, prompt_tokens, stats")
    add_model_flags(gen)
    add_policy_flags(gen)
    add_sampling_flags(gen, max_new_tokens=1024)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="run benchmarks and report Pass@1 (avg@k), pass@k, maj@k, TPS and KV memory")
    ev.add_argument("--datasets", default="demo",
                    help="comma-separated: aime24, aime25, amc23, gpqa_d, math500, gaokao2023en, gsm8k, demo "
                         "(default: demo, a built-in arithmetic set)")
    ev.add_argument("--samples", type=int, default=5, help="samples per problem; Pass@1 = avg@k (default 5)")
    ev.add_argument("--limit", type=int, default=None, help="first N problems of each dataset")
    ev.add_argument("--data-dir", default=None,
                    help="directory of benchmark JSONL files (default: $DYNTS_DATA_DIR, else the Hugging Face hub)")
    ev.add_argument("--out", required=True, help="run directory: run.json, samples.jsonl, metrics.json, report.md; "
                    "rerunning the same command resumes")
    add_model_flags(ev)
    add_policy_flags(ev)
    add_sampling_flags(ev, max_new_tokens=16384)
    add_ray_flags(ev)
    ev.set_defaults(func=cmd_eval)

    col = sub.add_parser("collect", help="generate reasoning traces with the full cache, graded and stored "
                         "resumably, for training an importance head")
    col.add_argument("--dataset", required=True, help="e.g. gsm8k (train split by default), math_train")
    col.add_argument("--split", default=None, help="dataset split (default: train for gsm8k)")
    col.add_argument("--samples", type=int, default=1, help="traces per problem (default 1)")
    col.add_argument("--limit", type=int, default=None, help="first N problems")
    col.add_argument("--correct-only", action="store_true",
                     help="label only the first correct trace of each problem (paper); off for tiny models")
    col.add_argument("--data-dir", default=None, help="directory of dataset JSONL files (default: $DYNTS_DATA_DIR)")
    col.add_argument("--out", required=True, help="trace directory (rerunning resumes)")
    add_model_flags(col)
    add_sampling_flags(col, max_new_tokens=16384)
    add_ray_flags(col)
    col.set_defaults(func=cmd_collect)

    lab = sub.add_parser("label", help="label the thinking tokens of collected traces by answer attention")
    lab.add_argument("dir", help="trace directory written by dynts collect; labels go to DIR/labels/")
    lab.add_argument("--model", default=None, help="must be the model that wrote the traces (default: that model)")
    lab.add_argument("--device", default=None)
    lab.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default fp32")
    lab.add_argument("--shard-size", type=int, default=64, help="traces per safetensors shard (default 64)")
    add_ray_flags(lab)
    lab.set_defaults(func=cmd_label)

    tr = sub.add_parser("train", help="fit an importance head on labelled traces (the LLM stays frozen)")
    tr.add_argument("dir", help="trace directory labelled by dynts label")
    tr.add_argument("--out", required=True, help="head directory: head.safetensors + head.json")
    tr.add_argument("--hidden", default="8192,2048", help="hidden layer widths (default 8192,2048, the paper's)")
    tr.add_argument("--epochs", type=int, default=15, help="default 15")
    tr.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    tr.add_argument("--transform", default="scale:10000",
                    help="label transform: scale:S (y = S x) or pow:P (y = 10 x^P / P) (default scale:10000)")
    tr.add_argument("--retention", type=float, default=0.4, help="r for the reported top-k recall (default 0.4)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None)
    tr.set_defaults(func=cmd_train)

    head = sub.add_parser("head", help="inspect importance heads")
    head_sub = head.add_subparsers(dest="head_command", required=True, metavar="ACTION")
    show = head_sub.add_parser("show", help="print a head's JSON config and metrics (default: the shipped head)")
    show.add_argument("path", nargs="?", default=None, help="head directory or file")
    show.set_defaults(func=cmd_head_show)

    fid = sub.add_parser("fidelity", help="replay reference traces teacher-forced under each policy and budget and "
                         "measure KL(full || policy) and top-1 agreement of next-token distributions")
    fid.add_argument("--traces", default=None, help="trace directory from dynts collect")
    fid.add_argument("--dataset", default=None, help="or: generate reference traces (greedy, full cache) from this")
    fid.add_argument("--data-dir", default=None, help="dataset directory (default: $DYNTS_DATA_DIR)")
    fid.add_argument("--limit", type=int, default=None, help="number of traces (default: all; 20 for --dataset); "
                     "with --traces, the first N with --min-tokens tokens whose prompts fit every budget")
    fid.add_argument("--min-tokens", type=int, default=1, help="with --traces: skip traces shorter than this")
    fid.add_argument("--max-new-tokens", type=int, default=1024, help="reference trace length for --dataset")
    fid.add_argument("--policies", default="full,window,streaming,sepllm,h2o,snapkv,rkv,dynts")
    fid.add_argument("--budgets", default="128,256,512", help="comma-separated budgets (default 128,256,512)")
    fid.add_argument("--window", type=int, default=32, help="W for every budget (default 32)")
    fid.add_argument("--ratio", type=float, default=0.5, help="r for every budget (default 0.5)")
    fid.add_argument("--head", default=None, help="importance head for dynts (default: the shipped one)")
    fid.add_argument("--out", required=True, help="writes fidelity.json, fidelity.md, fidelity_kl.png/pdf/csv")
    add_model_flags(fid)
    fid.set_defaults(func=cmd_fidelity)

    rep = sub.add_parser("report", help="recompute and print the metrics of a run directory")
    rep.add_argument("out", help="run directory written by dynts eval")
    rep.set_defaults(func=cmd_report)
    reg = sub.add_parser("regrade", help="re-grade the stored responses of a run with the current grader")
    reg.add_argument("out", help="run directory written by dynts eval")
    reg.set_defaults(func=cmd_regrade)

    from dynts.cli.sweep import register as register_sweep

    register_sweep(sub)
    from dynts.cli.bench import register as register_bench
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DynTSError as exc:
        print(f"dynts: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynts: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
