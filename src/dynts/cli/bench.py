"""`dynts bench`: register(subparsers) adds the subcommand to the dynts parser (see bench.py for what it measures)."""

from __future__ import annotations

import json

from dynts.cli.args import add_device_flags, add_frame_flags, add_kernel_flags, add_policy_flag, add_policy_opt_flag
from dynts.models.shapes import SHAPES


def register(subparsers) -> None:
    b = subparsers.add_parser(
        "bench",
        help="decode throughput of the fast path against the memory-bandwidth bound (random weights)",
        description="Decode a batch of random prompts for a forced number of tokens on a model of a real "
        "architecture with random weights, and print end-to-end and forward-only TPS, ms per step, peak memory, "
        "the roofline bound for the shape and the fraction reached, and the share of step time spent on "
        "scoring, sampling and eviction. --compare-eager times the paper's setup (a transformers loop with a "
        "growing cache, no eviction) on the same model in the same run.",
    )
    g = b.add_argument_group("model")
    g.add_argument(
        "--shape",
        default="smollm2-135m",
        help=f"{', '.join(SHAPES)}, a model directory or a Hugging Face id (its config; default "
        "smollm2-135m, the embedded model's shape)",
    )
    weights = g.add_mutually_exclusive_group()
    weights.add_argument(
        "--random-weights",
        dest="random_weights",
        action="store_true",
        default=True,
        help="random weights of the shape's architecture, nothing downloaded (the default)",
    )
    weights.add_argument(
        "--real-weights",
        dest="random_weights",
        action="store_false",
        help="load the real weights (the embedded GGUF, or the Hugging Face model)",
    )
    add_device_flags(g)
    g = b.add_argument_group("workload")
    g.add_argument(
        "--batch", default="20", help="sequences decoded together, or 'max': the largest that fits (CUDA) (default 20)"
    )
    add_frame_flags(g)
    g.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens per sequence (default 128)")
    g.add_argument("--new-tokens", type=int, default=8192, help="forced generation length (default 8192)")
    add_policy_flag(
        g,
        "eviction policy (default dynts, with a random importance head of the paper's size "
        "8192,2048 for large models, 512,128 for small ones)",
    )
    add_policy_opt_flag(g)
    g.add_argument("--head-layers", default=None, help="importance head widths, e.g. 8192,2048")
    g.add_argument("--seed", type=int, default=0)
    g = b.add_argument_group("engine")
    add_kernel_flags(g)
    g.add_argument(
        "--check-every",
        type=int,
        default=None,
        help="decode steps between host reads of generated tokens (default 16 on CUDA, 1 on CPU)",
    )
    g.add_argument(
        "--eager-engine",
        dest="fast",
        action="store_false",
        help="measure our eager budgeted Engine instead of the fast path",
    )
    g = b.add_argument_group("report")
    g.add_argument(
        "--compare-eager",
        action="store_true",
        help="also time a transformers eager loop with a growing DynamicCache (the paper's setup)",
    )
    g.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        metavar="GBPS",
        help="memory bandwidth for the roofline in GB/s (default: measured with a large copy)",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from dynts.config import parse_widths
    from dynts.experiments.bench import BenchConfig, format_report, parse_batch, run_bench
    from dynts.fast.compiled_step import compile_from_environment
    from dynts.policies import policy_config
    from dynts.policies.options import parse_assignments
    from dynts.runtime.executor import options_key

    options = parse_assignments(args.policy_opt)
    policy_config(args.policy, options)

    config = BenchConfig(
        shape=args.shape,
        random_weights=args.random_weights,
        batch=parse_batch(args.batch),
        budget=args.budget,
        window=args.window,
        ratio=args.ratio,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        policy=args.policy,
        policy_options=options_key(options),
        compare_eager=args.compare_eager,
        device=args.device,
        dtype=args.dtype,
        bandwidth_gbps=args.bandwidth,
        fast=args.fast,
        kernel=args.kernel,
        graphs=args.graphs,
        check_every=args.check_every,
        compile=compile_from_environment(args.compile),
        head_layers=None if args.head_layers is None else parse_widths(args.head_layers, "--head-layers"),
        seed=args.seed,
    )
    report = run_bench(config)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
