"""Flags that several commands share, their defaults, and their conversion into configs.

A leaf of the cli package: it imports no other cli module. Heavy imports (torch, the policy registry) happen
inside functions, so `dynts --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dynts.config import (
    DTYPES,
    KERNELS,
    PAPER_BUDGET,
    PAPER_RATIO,
    PAPER_WINDOW,
    SamplingConfig,
    check_batch_size,
)
from dynts.errors import DynTSError
from dynts.harness.store import MANIFEST_FILE

SAMPLING_DEFAULTS = SamplingConfig()


# --- model, policy, sampling ----------------------------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="smollm2-135m",
        help="Hugging Face id, local directory, .gguf file, or the embedded 'smollm2-135m' (default)",
    )
    add_device_flags(g)


def add_device_flags(g, dtype_default: str = "bf16 on CUDA, fp32 on CPU") -> None:
    """--device and --dtype, the same for every command that loads or builds a model (dtype_default: what the
    command takes when --dtype is not given, for its help)."""
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help=f"weights and cache dtype (default: {dtype_default})",
    )


def add_policy_opt_flag(p, scope: str = "the policy") -> None:
    p.add_argument(
        "--policy-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"set an option of {scope} (repeatable); `dynts policies` lists every policy's options",
    )


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    from dynts.policies import POLICY_NAMES

    g = p.add_argument_group("KV budget")
    add_policy_flag(g, f"eviction policy: {', '.join(POLICY_NAMES)} (default: dynts; see dynts policies)")
    add_policy_opt_flag(g)
    add_frame_flags(g)
    g.add_argument(
        "--head",
        default=None,
        help="importance head checkpoint for dynts policies (default: the head shipped for the model)",
    )


def add_policy_flag(g, help: str) -> None:
    """--policy: one registered policy, dynts by default."""
    from dynts.policies import POLICY_NAMES

    g.add_argument("--policy", default="dynts", choices=list(POLICY_NAMES), metavar="POLICY", help=help)


def add_frame_flags(g, budget: int = PAPER_BUDGET, window: int = PAPER_WINDOW, ratio: float = PAPER_RATIO) -> None:
    g.add_argument(
        "--budget",
        type=int,
        default=budget,
        help=f"B: a sequence compresses when its cache holds B tokens (default {budget})",
    )
    g.add_argument(
        "--window",
        type=int,
        default=window,
        help=f"W: most recent tokens always kept; 0 only for the dynts ablation (default {window})",
    )
    g.add_argument(
        "--ratio",
        type=float,
        default=ratio,
        help=f"r: share of the older L-W tokens a compression keeps, in (0, 1] (default {ratio})",
    )


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    d = SAMPLING_DEFAULTS
    g = p.add_argument_group("sampling")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-p/top-k)")
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"default {d.temperature}")
    g.add_argument("--top-p", type=float, default=d.top_p, help=f"default {d.top_p}")
    g.add_argument("--top-k", type=int, default=d.top_k, help=f"default {d.top_k} (0 disables)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--batch-size", type=int, default=8, help="sequences decoded together (default 8)")
    add_decode_flags(p)


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    from dynts.engine.scheduler import BATCHING

    g = p.add_argument_group("decode path")
    g.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static fast decode path: CUDA graphs on a GPU, packed weights on a CPU (default: on; --no-fast: the "
        "eager engine); greedy output is the same either way, sampled output differs (counter-based noise)",
    )
    g.add_argument(
        "--batching",
        default="continuous",
        choices=BATCHING,
        help="continuous: a row whose sequence ends takes the next request at once (default); static: batches of "
        "--batch-size run until their last sequence ends",
    )
    add_kernel_flags(g)


def add_kernel_flags(g) -> None:
    """--kernel and --graphs/--no-graphs of the fast path, the same for eval, sweep, collect and bench."""
    g.add_argument(
        "--kernel",
        default=None,
        choices=KERNELS,
        help="fast path decode attention (default: $DYNTS_KERNEL, else auto: flash, then triton on CUDA; sdpa "
        "elsewhere); a kernel that fails its first check against SDPA falls back to sdpa with a warning",
    )
    g.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the fast path's step as CUDA graphs (default: $DYNTS_GRAPHS, else on with CUDA); a capture "
        "that fails falls back to eager steps with a warning",
    )
    add_compile_flag(g)


def add_compile_flag(g) -> None:
    """--compile/--no-compile (for every command that builds a fast-path engine; serve too)."""
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the fast path's decode step, once per batch shape, its time reported (default: "
        "$DYNTS_COMPILE, else off); a compile that fails falls back to the eager step with a warning",
    )


def sampling_from_args(args, max_new_tokens: int | None = None) -> SamplingConfig:
    return SamplingConfig(
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_new_tokens=max_new_tokens or args.max_new_tokens,
    )


def policy_options_from_args(args) -> dict:
    """--policy-opt KEY=VALUE flags, checked against --policy (an unknown key or a bad value: DynTSError)."""
    from dynts.policies import policy_config
    from dynts.policies.options import parse_assignments

    options = parse_assignments(args.policy_opt)
    policy_config(args.policy, options)
    return options


def budget_from_args(args):
    from dynts.policies import budget_for

    return budget_for(args.policy, args.budget, args.window, args.ratio)


def engine_spec_from_args(args):
    """The engine settings of the flags, every one checked, without loading anything."""
    from dynts.engine.spec import EngineSpec, options_key

    budget = budget_from_args(args)
    sampling = sampling_from_args(args)
    options = policy_options_from_args(args)
    check_batch_size(args.batch_size)
    if args.head is not None and not Path(args.head).exists():
        raise DynTSError(f"--head {args.head} does not exist")
    return EngineSpec(
        args.policy,
        budget,
        sampling,
        args.batch_size,
        head_path=args.head,
        fast=args.fast,
        policy_options=options_key(options),
        batching=args.batching,
        kernel=args.kernel,
        graphs=args.graphs,
        compile=getattr(args, "compile", None),
        max_model_len=getattr(args, "max_model_len", None),  # a command with a --max-model-len flag (serve)
    )


# --- where the work runs: here, or on Ray (--ray) ---------------------------------------------------
def add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('scale-out on Ray (pip install "dynts[ray]")')
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray workers; the driver alone writes the results, as a local run does. Without "
        "ADDRESS: start a local Ray instance; 'auto' or ray://HEAD:10001: join an existing cluster "
        "(before a positional argument write --ray=ADDRESS)",
    )
    g.add_argument(
        "--workers", type=int, default=None, metavar="N", help="Ray workers, each holding one model replica (default 1)"
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs each worker reserves (default: 1 when CUDA is present and --device is not cpu, else 0)",
    )


# --- data --------------------------------------------------------------------------------------------
def add_data_dir_flag(p) -> None:
    """--data-dir, the same for every command that reads benchmark or training data (harness/datasets.py)."""
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory of dataset JSONL files (default: $DYNTS_DATA_DIR, else the Hugging Face hub)",
    )


# --- small parsers ------------------------------------------------------------------------------------
def existing_run(out: str) -> Path:
    path = Path(out)
    if not (path / MANIFEST_FILE).is_file():
        raise DynTSError(f"{path} is not a dynts run directory (no {MANIFEST_FILE})")
    return path
