"""The checks of benchmarks/gpu_probe.sh, one mode per call; each prints summary lines starting with "[" and never
raises (a failure is a FAIL line naming the exception and the last dynts frame).

Modes:
  env                 torch / CUDA / triton / flash-attn / transformers / pytest, and what kernel "auto" picks
  tests T             the CUDA tests (pytest -k cuda: real graphs, refills after capture, bf16 near-ties, the
                      capture-safety events) within T seconds, one line per failure
  equality            fast path (graphs on CUDA) vs the eager Engine, greedy, on tiny random models: 9 requests on
                      3 rows (refills after the capture), the capture guard on, then where a steady run syncs
  contbatch           continuous vs static batching on the fast path (random EOS ids: sequences end at varied steps)
  cli-bench NAME JSON T -- ARGS   `python -m dynts bench ARGS --json` within T s; its JSON saved, one line printed
  kernels             the length-aware decode kernels at the 7B decode shapes: error, graph replay with new lengths
Run from the repository root with src/ importable (gpu_probe.sh does both). PROBE_DEVICE=cpu runs the same logic on
tiny shapes without a GPU (the script's dry run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import traceback
import warnings

ROOT = os.getcwd()
DEV = os.environ.get("PROBE_DEVICE", "cuda")
CPU = DEV == "cpu"
sys.path.insert(0, os.path.join(ROOT, "src"))
warnings.filterwarnings("ignore", category=FutureWarning)


def say(line: str) -> None:
    print(line, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240] if text else ''}"


def where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/dynts/" in f.filename]
    return f" at {frames[-1].filename.split('/src/')[-1]}:{frames[-1].lineno}" if frames else ""


def tiny_model(vocab_size: int = 128, dtype=None):
    """A tiny random Qwen2 (hidden 64, 2 layers, 4 heads, 2 KV heads, as the tests' tiny models) on the probe's
    device, built through `random_model` from a config directory (no pytest needed, unlike tests/conftest.py)."""
    import tempfile

    import torch
    from transformers import Qwen2Config

    from dynts.models.shapes import random_model

    path = tempfile.mkdtemp(prefix="probe-tiny-")
    Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ).save_pretrained(path)
    return random_model(path, device=DEV, dtype=dtype or torch.float32, seed=0)


def cuda_dead(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("device-side assert", "illegal memory access", "CUDA error", "unspecified launch"))


# --- env ------------------------------------------------------------------------------------------------------
def env() -> None:
    import torch

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    ok = torch.cuda.is_available()
    if ok:
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        memory = f"{free / 2**30:.0f}/{total / 2**30:.0f} GiB free"
        parts.append(f"{p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {memory}")
    else:
        parts.append("no CUDA device")
    for mod in ("triton", "flash_attn", "transformers", "pytest"):
        try:
            m = __import__(mod)
            parts.append(f"{mod} {getattr(m, '__version__', 'ok')}")
        except Exception as exc:  # noqa: BLE001
            parts.append(f"{mod} missing ({type(exc).__name__})")
    try:
        import dynts
        from dynts.fast.attention import resolve_kernel

        parts.append(f"dynts from {os.path.relpath(os.path.dirname(dynts.__file__), ROOT)}")
        if ok:
            parts.append(f"kernel auto -> {resolve_kernel('auto', torch.device('cuda'), torch.bfloat16)}")
    except Exception as exc:  # noqa: BLE001
        ok = False
        parts.append(f"dynts import FAILED {first_line(exc)}")
    say(f"[env] {'PASS' if ok or CPU else 'FAIL'} " + " | ".join(parts))


# --- tests -------------------------------------------------------------------------------------------------------
TEST_FILES = ["tests/test_fast_engine.py", "tests/test_capture_safety.py", "tests/test_scheduler.py"]


def tests(timeout: float) -> None:
    """The tests whose names hold "cuda" (they carry a skipif mark bound to the name `cuda`; no marker exists)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        say("[tests -k cuda] SKIPPED: no pytest here; carry its wheels (see the header of benchmarks/gpu_probe.sh)")
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES, "-k", "cuda", "-rfE"]
    cmd += ["--tb=line", "-W", "ignore::UserWarning"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        sys.stdout.write(out[-4000:])
        done = out.count(".") + out.count("F")
        say(f"[tests -k cuda] FAIL timed out after {timeout:.0f} s ({done} tests had run)")
        return
    out = proc.stdout + proc.stderr
    sys.stdout.write(out[-12000:])
    lines = [ln for ln in out.splitlines() if ln.strip()]
    pattern = r"\d+ (passed|failed|skipped|errors?|deselected)|no tests ran"
    total = next((ln for ln in reversed(lines) if re.search(pattern, ln)), "?")
    say(f"[tests -k cuda] {'PASS' if proc.returncode == 0 else 'FAIL'} rc={proc.returncode}: {total.strip('= ')}")
    for ln in lines:
        if ln.startswith(("FAILED", "ERROR")):
            say(f"[tests] {ln[:300]}")


# --- equality -----------------------------------------------------------------------------------------------------
PROMPTS = [
    [5, 17, 3, 99, 42, 8, 61],
    [7, 8, 9],
    [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [1, 2],
    [30, 31, 32, 33, 34],
    [100, 90, 80, 70, 60, 50, 40, 30, 20],
    [64],
    [3, 1, 4, 1, 5, 9, 2, 6],
    [27, 18, 28, 18, 28, 45],
]


def equality() -> None:
    import torch

    from dynts.config import BudgetConfig, SamplingConfig
    from dynts.engine.engine import Engine
    from dynts.fast.fast_engine import FastConfig, FastEngine
    from dynts.models.importance_head import random_head

    greedy = SamplingConfig(greedy=True, max_new_tokens=45, ignore_eos=True)
    kernels = ("sdpa",) if CPU else ("sdpa", "triton")
    for policy in ("window", "dynts", "h2o"):
        for kernel in kernels:
            name = f"equality fp32 {policy} {kernel}, 9 requests on 3 rows, capture guard on"
            try:
                lm = tiny_model()
                head = random_head(lm.hidden_size).to(DEV) if policy == "dynts" else None
                budget = BudgetConfig(28, 4, 0.5)
                eager = Engine(lm, policy, budget, greedy, 3, head=head)
                config = FastConfig(kernel=kernel, capture_check=True, check_every=4)
                fast = FastEngine(lm, policy, budget, greedy, 3, head=head, fast=config)
                guards = []
                make = fast.stepper

                def watched(rows, capacity, on_logits=None, make=make, guards=guards):
                    stepper = make(rows, capacity, on_logits)
                    guards.append(stepper.static_step.capture_guard)
                    return stepper

                fast.stepper = watched
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    a = eager.generate(PROMPTS)
                    b = fast.generate(PROMPTS)
                if not CPU:
                    torch.cuda.synchronize()
                same = sum(x.token_ids == y.token_ids for x, y in zip(a.results, b.results))
                prof = fast.last_profile
                checks = sum(g.checks for g in guards)
                notes = [str(w.message)[:120] for w in caught if "fast" in str(w.message) or "kernel" in str(w.message)]
                ok = same == len(PROMPTS) and (prof.graphs or CPU) and checks > 0
                say(
                    f"[{name}] {'PASS' if ok else 'FAIL'} same_tokens={same}/{len(PROMPTS)} kernel={prof.kernel} "
                    f"graphs={prof.graphs} captures={prof.captures} guarded_replays={checks}"
                    + (f" warnings={notes}" if notes else "")
                )
            except Exception as exc:  # noqa: BLE001
                say(f"[{name}] FAIL {first_line(exc)}{where(exc)}")
                if cuda_dead(exc):
                    say("[equality] STOP: the CUDA context is dead (a sticky error); the later checks here skipped")
                    return
    if CPU:
        return
    # where a steady-state run with refills syncs (torch's sync debug mode flags D2H reads, pageable H2D copies)
    try:
        lm = tiny_model(dtype=torch.bfloat16)
        sampling = SamplingConfig(greedy=True, max_new_tokens=96, ignore_eos=True)
        fast = FastEngine(lm, "window", BudgetConfig(28, 4, 0.5), sampling, 3, fast=FastConfig())
        fast.generate(PROMPTS)  # warm-up
        sites: dict[str, int] = {}

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                frames = [f for f in traceback.extract_stack()[:-1] if "/dynts/" in f.filename]
                key = f"{frames[-1].filename.split('/src/')[-1]}:{frames[-1].lineno}" if frames else "outside dynts"
                sites[key] = sites.get(key, 0) + 1

        old = warnings.showwarning
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fast.generate(PROMPTS)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning = old
        prof = fast.last_profile
        say(
            f"[sync audit window bf16, 9 requests on 3 rows] INFO {sum(sites.values())} flagged syncs over "
            f"{prof.steps} steps, {prof.host_reads} reads, {prof.captures} captures: {json.dumps(sites)}"
        )
    except Exception as exc:  # noqa: BLE001
        say(f"[sync audit] FAIL {first_line(exc)}{where(exc)}")


# --- continuous batching ---------------------------------------------------------------------------------------------
def contbatch() -> None:
    import torch

    from dynts.config import BudgetConfig, SamplingConfig
    from dynts.engine.requests import Request
    from dynts.fast.fast_engine import FastConfig, FastEngine
    from dynts.models.importance_head import random_head
    from dynts.models.shapes import random_model

    if CPU:  # the dry run: a tiny model, a few requests
        lm, n_req, tokens, budget, rows = tiny_model(vocab_size=2048), 8, 48, BudgetConfig(32, 8, 0.5), 4
        eos, low, high, short, long = tuple(range(1000, 1100)), 100, 2000, 4, 12
        head = random_head(lm.hidden_size)
    else:  # the embedded model's shape (its GGUF can't travel), random weights; 330 ids declared EOS (mean ~150)
        lm = random_model("smollm2-135m", device=DEV, dtype=torch.bfloat16, seed=0)
        n_req, tokens, budget, rows = 32, 256, BudgetConfig(256, 64, 0.5), 8
        eos, low, high, short, long = tuple(range(1000, 1330)), 2000, 40000, 16, 64
        head = random_head(lm.hidden_size, layers=(512, 128)).to(DEV, torch.bfloat16)
    lm = dataclasses.replace(lm, eos_token_ids=eos)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=tokens)
    g = torch.Generator().manual_seed(1)
    requests = [
        Request.of(
            torch.randint(low, high, (int(torch.randint(short, long, (1,), generator=g)),), generator=g).tolist(),
            seed=1000 + i,
            key=i,
        )
        for i in range(n_req)
    ]
    results, tokens_by = {}, {}
    for batching in ("continuous", "static"):
        try:
            engine = FastEngine(lm, "dynts", budget, sampling, rows, head=head, batching=batching, fast=FastConfig())
            list(engine.stream(requests[:rows]))  # warm-up: Triton compile, capture
            active = []
            engine.on_step = active.append
            start = time.perf_counter()
            out = {request.key: result.token_ids for request, result in engine.stream(requests)}
            wall = time.perf_counter() - start
            n = sum(len(t) for t in out.values())
            prof = engine.last_profile
            results[batching], tokens_by[batching] = n / wall, out
            lengths = sorted(len(t) for t in out.values())
            say(
                f"[contbatch fast {batching}] PASS {len(out)}/{n_req} requests, {n} tokens in {wall:.1f} s = "
                f"{n / wall:.0f} TPS, mean active rows {sum(active) / max(1, len(active)):.2f}/{rows} over "
                f"{len(active)} steps, last run's captures {prof.captures} ({prof.capture_s:.1f} s), lengths "
                f"min/median/max {lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}, kernel {prof.kernel}"
            )
        except Exception as exc:  # noqa: BLE001
            say(f"[contbatch fast {batching}] FAIL {first_line(exc)}{where(exc)}")
            if cuda_dead(exc):
                return
    if len(results) == 2:
        ratio = results["continuous"] / results["static"]
        same = sum(tokens_by["static"][k] == tokens_by["continuous"][k] for k in tokens_by["static"])
        say(
            f"[contbatch ratio] {'PASS' if ratio >= 1.0 else 'FAIL'} continuous/static = {ratio:.2f}x (target >= 1); "
            f"same tokens per request both ways {same}/{n_req} (counter-based sampling: batch-invariant up to rounding)"
        )


# --- benches ----------------------------------------------------------------------------------------------------------
def summarize(r: dict, name: str) -> str:
    """One line; the targets (R1-Qwen-7B on an H200): >= 80 % of the roofline (embedding rows only, roofline.py),
    eviction + scoring <= 3 % of the step time."""
    o, roof = r["ours"], r["roofline"]
    share = o.get("eviction_scoring_share", float("nan"))
    fraction = o["tps"] / roof["tps_bound"]
    targets = (
        f" | targets: >=80% of roofline {'MET' if fraction >= 0.8 else 'NOT MET'}, evict+score <=3% "
        f"{'MET' if share <= 0.03 else 'NOT MET'}"
    )
    return (
        f"[{name}] {'PASS' if o['tps'] > 0 else 'FAIL'} batch {r['batch']} kernel {o.get('kernel')} graphs "
        f"{o.get('graphs')} captures {o.get('captures')} | {o['tps']:.0f} TPS, {o['ms_per_step']:.2f} ms/step, "
        f"forward-only {o['tps_forward']:.0f} | roofline {roof['tps_bound']:.0f} TPS ({fraction:.1%}), weights "
        f"{roof['weight_bytes'] / 1e9:.2f} GB, mean cached {roof['mean_cached_tokens']:.0f} tok, bw "
        f"{roof['bandwidth_gbps']:.0f} GB/s | evict+score {share:.2%}, compressions {o.get('compressions')} | peak "
        f"{o['peak_memory_bytes'] / 2**30:.1f} GiB | prefill {o['prefill_s']:.1f} s{targets}"
    )


def cli_bench(name: str, json_out: str, args: list[str], timeout: float) -> None:
    cmd = [sys.executable, "-m", "dynts", "bench", *args, "--json"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"[{name}] FAIL timed out after {timeout:.0f} s")
        return
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        frames = [ln.strip() for ln in lines if ln.strip().startswith("File ") and "/dynts/" in ln]
        at = f" (last dynts frame: {frames[-1].split('/src/')[-1]})" if frames else ""
        sys.stderr.write(proc.stderr[-6000:])
        say(f"[{name}] FAIL rc={proc.returncode}: {(lines[-1] if lines else '')[:300]}{at}")
        return
    try:
        with open(json_out, "w") as f:
            f.write(proc.stdout)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        say(summarize(report, name) + f" ({time.perf_counter() - start:.0f} s)")
    except Exception as exc:  # noqa: BLE001
        say(f"[{name}] FAIL unreadable output {first_line(exc)}: {proc.stdout[-300:]}")


# --- kernels ----------------------------------------------------------------------------------------------------
def kernels() -> None:
    import torch

    from dynts.fast.attention import _flash_with_kvcache, check_kernel

    if CPU:
        say("[kernels] SKIPPED on a CPU")
        return
    dev = torch.device("cuda")
    names = ["triton"] + (["flash"] if _flash_with_kvcache() is not None else [])
    for kern in names:  # the engine's own self-check at the batch-20 and a large-batch shape
        for rows in (20, 320):
            t = time.perf_counter()
            try:
                reason = check_kernel(kern, rows, 28, 4, 128, 5000, torch.bfloat16, dev)
                say(
                    f"[check_kernel {kern} rows={rows} r1-qwen-7b] {'PASS' if reason is None else 'FAIL ' + reason} "
                    f"({time.perf_counter() - t:.1f} s)"
                )
            except Exception as exc:  # noqa: BLE001
                say(f"[check_kernel {kern} rows={rows}] FAIL raised {first_line(exc)}")
                if cuda_dead(exc):
                    return


if __name__ == "__main__":
    mode = sys.argv[1]
    try:
        if mode == "cli-bench":
            name, json_out, timeout = sys.argv[2], sys.argv[3], float(sys.argv[4])
            cli_bench(name, json_out, sys.argv[sys.argv.index("--") + 1 :], timeout)
        elif mode == "tests":
            tests(float(sys.argv[2]))
        else:
            {"env": env, "kernels": kernels, "equality": equality, "contbatch": contbatch}[mode]()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        say(f"[{mode}] FAIL {first_line(exc)}{where(exc)}")
