"""Throughput of the DynTS engine vs transformers (a greedy loop over its dynamic cache), side by side in one run.

Both decode the same batch of prompts greedily for a forced number of tokens on the embedded model:
  (a) policy `full`, 1k new tokens;
  (b) policy `dynts`, B=256 W=64 r=0.5, 2k new tokens (transformers keeps the whole cache).
Ours runs on the eager engine and on the static fast path with the compiled step (compiled before timing; the
compile time is printed; --no-compiled leaves those rows out). Prints TPS for each and ends with
`ratio full=X budget=Y` (the eager engine's TPS / theirs) and, with the compiled rows, `compiled_full=X
compiled_budget=Y` on the same line (compiled / theirs).

    python benchmarks/engine_vs_hf.py [--batch 8] [--full-tokens 1024] [--budget-tokens 2048]
"""

from __future__ import annotations

import argparse
import time

import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.experiments.bench import eager_transformers_loop
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.harness.datasets import load_dataset
from dynts.models.importance_head import random_head, shipped_head_path
from dynts.models.loading import load_model


def hf_tps(loaded, prompts: list[list[int]], new_tokens: int) -> float:
    """Transformers with its dynamic cache (the paper's setup, dynts bench's baseline loop), prefill included."""
    eager_transformers_loop(loaded, prompts[:2], 2)  # warm-up
    return eager_transformers_loop(loaded, prompts, new_tokens)["tps_with_prefill"]


def compiled_tps(loaded, prompts, new_tokens: int, policy: str, budget: BudgetConfig, head=None):
    """The static fast path with the compiled step (every row count compiled first); (TPS, compile seconds)."""
    sampling = SamplingConfig(greedy=True, max_new_tokens=new_tokens, ignore_eos=True)
    engine = FastEngine(loaded, policy, budget, sampling, len(prompts), head=head, fast=FastConfig(compile=True))
    capacity = budget.budget if budget.compresses else max(len(p) for p in prompts) + new_tokens
    compile_s = engine.warm_up([len(prompts)], capacity)  # EOS is ignored: every row ends together, no release
    start = time.perf_counter()
    out = engine.generate(prompts)
    return out.stats.generated_tokens / (time.perf_counter() - start), compile_s


def our_tps(loaded, prompts, new_tokens: int, policy: str, budget: BudgetConfig, head=None) -> float:
    sampling = SamplingConfig(greedy=True, max_new_tokens=new_tokens, ignore_eos=True)
    Engine(
        loaded,
        policy,
        BudgetConfig(None) if policy == "full" else budget,
        SamplingConfig(greedy=True, max_new_tokens=2),
        head=head,
    ).generate(prompts[:2])  # warm-up
    engine = Engine(loaded, policy, budget, sampling, batch_size=len(prompts), head=head)
    start = time.perf_counter()
    out = engine.generate(prompts)
    elapsed = time.perf_counter() - start  # prefill included, as in generate's wall time
    return out.stats.generated_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--full-tokens", type=int, default=1024)
    parser.add_argument("--budget-tokens", type=int, default=2048)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", device="cpu", dtype="fp32")
    problems = load_dataset("demo")[: args.batch]
    engine = Engine(loaded, "full", None, SamplingConfig(greedy=True))
    prompts = [engine.encode(p.question) for p in problems]
    head_path = shipped_head_path(loaded.name)
    head = None if head_path else random_head(loaded.hidden_size)
    print(f"batch {len(prompts)}, prompt lengths {[len(p) for p in prompts]}, torch threads {torch.get_num_threads()}")
    print(f"dynts head: {'shipped ' + str(head_path) if head_path else 'fixed random weights (no shipped head)'}")

    ours_full = our_tps(loaded, prompts, args.full_tokens, "full", BudgetConfig(None))
    theirs_full = hf_tps(loaded, prompts, args.full_tokens)
    print(f"(a) full, {args.full_tokens} tokens: dynts {ours_full:.1f} TPS, transformers {theirs_full:.1f} TPS")

    budget = BudgetConfig(256, 64, 0.5)
    ours_budget = our_tps(loaded, prompts, args.budget_tokens, "dynts", budget, head=head)
    theirs_budget = hf_tps(loaded, prompts, args.budget_tokens)
    print(
        f"(b) dynts B=256 W=64 r=0.5, {args.budget_tokens} tokens: dynts {ours_budget:.1f} TPS, "
        f"transformers {theirs_budget:.1f} TPS"
    )
    ratio = f"ratio full={ours_full / theirs_full:.2f} budget={ours_budget / theirs_budget:.2f}"
    if args.compiled:
        full_c, full_s = compiled_tps(loaded, prompts, args.full_tokens, "full", BudgetConfig(None))
        budget_c, _ = compiled_tps(loaded, prompts, args.budget_tokens, "dynts", budget, head=head)
        print(f"compiled step: (a) {full_c:.1f} TPS (compiled in {full_s:.0f} s), (b) {budget_c:.1f} TPS")
        ratio += f" compiled_full={full_c / theirs_full:.2f} compiled_budget={budget_c / theirs_budget:.2f}"
    print(ratio)


if __name__ == "__main__":
    main()
