"""Continuous vs static batching on the embedded model, the same requests both ways, side by side in one run.

The demo set x 4 samples with the protocol's sampling (temperature 0.6, top-p 0.95, top-k 20), max_new_tokens
320, batch 8, policy dynts B=256 W=64 r=0.5. Static batching (--batching static) runs 8 requests until the
longest of them ends; continuous batching gives a row the next request the moment its sequence ends. Prints,
for both: throughput (all generated tokens / wall time including prefill), mean active rows per decode step,
and the time to the first finished sample; the last line reads `ratio continuous/static=X`.

    python benchmarks/continuous_batching.py [--samples 4] [--batch 8] [--max-new-tokens 320] [--fast]

--fast runs the static fast path (CUDA graphs on a GPU; eagerly, same shapes, on a CPU). Run it on a quiet
machine (OMP_NUM_THREADS=1 when anything else runs).
"""

from __future__ import annotations

import argparse
import time
import zlib

import torch

from dynts.api import make_engine
from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.requests import Request
from dynts.harness.datasets import load_dataset
from dynts.harness.prompts import question_text
from dynts.models.loading import load_model


def measure(engine, requests: list[Request]) -> dict:
    active = []
    engine.on_step = active.append
    start = time.perf_counter()
    first = None
    tokens = 0
    for _request, result in engine.stream(requests):
        first = first if first is not None else time.perf_counter() - start
        tokens += len(result.token_ids)
    wall = time.perf_counter() - start
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tps": tokens / wall,
        "mean_active_rows": sum(active) / len(active),
        "steps": len(active),
        "first_result_s": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--fast", action="store_true", help="the static fast path instead of the eager engine")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    loaded = load_model("smollm2-135m", device=args.device)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)  # the protocol's sampling, seed 42
    budget = BudgetConfig(256, 64, 0.5)
    engines = {
        batching: make_engine(loaded, "dynts", budget, sampling, args.batch, fast=args.fast, batching=batching)
        for batching in ("static", "continuous")
    }
    encoder = engines["static"]
    problems = load_dataset("demo")
    requests = [
        Request.of(encoder.encode(question_text(p)), zlib.crc32(f"{sampling.seed}:{p.id}:{s}".encode()), (p.id, s))
        for p in problems
        for s in range(args.samples)
    ]
    print(
        f"{len(requests)} requests (demo x {args.samples}), batch {args.batch}, max_new_tokens "
        f"{args.max_new_tokens}, dynts B=256 W=64 r=0.5, {'fast' if args.fast else 'eager'} path on "
        f"{loaded.device}, torch threads {torch.get_num_threads()}"
    )
    measure(engines["static"], requests[: args.batch])  # warm-up
    results = {}
    for batching in ("static", "continuous"):
        results[batching] = r = measure(engines[batching], requests)
        print(
            f"{batching:<11} {r['tokens']} tokens in {r['wall_s']:.1f} s: {r['tps']:.1f} tokens/s, mean active rows "
            f"{r['mean_active_rows']:.2f} of {args.batch} over {r['steps']} steps, first sample after "
            f"{r['first_result_s']:.1f} s"
        )
    same = results["static"]["tokens"] == results["continuous"]["tokens"]
    print(f"same tokens generated both ways: {same}")
    print(f"ratio continuous/static={results['continuous']['tps'] / results['static']['tps']:.2f}")


if __name__ == "__main__":
    main()
