"""`dynts bench`: decode throughput of the budgeted engine against the memory-bandwidth bound.

Builds a model of a real architecture with random weights (speed depends on the shape, not the weights),
decodes a batch of random prompts for a forced number of tokens, and reports end-to-end TPS (decode wall time,
scoring, eviction and sampling included), forward-only TPS, ms per step, peak memory, the roofline bound for
that shape (roofline.py) and the fraction reached, and where the step time went. With compare_eager the same
model also runs the paper's setup in the same process: a plain transformers loop, one token per step with a
growing DynamicCache and no eviction, and the ratio is printed.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from dynts.config import PAPER_BUDGET, PAPER_RATIO, PAPER_WINDOW, BudgetConfig, SamplingConfig
from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.experiments.roofline import (
    kv_bytes_per_token,
    measure_bandwidth,
    parameter_bytes,
    roofline,
    streamed_weight_bytes,
)
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.models.importance_head import random_head
from dynts.models.loading import default_device, load_model, resolve_dtype
from dynts.models.shapes import SHAPES, head_dim, random_model
from dynts.policies import budget_for, make_policy

PAPER_HEAD_LAYERS = (8192, 2048)
SMALL_HEAD_LAYERS = (512, 128)  # the size of the head shipped for the embedded model


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; every field is checked before any model is built."""

    shape: str = "smollm2-135m"
    random_weights: bool = True
    batch: int | None = 20  # None: the largest batch that fits (CUDA only)
    budget: int = PAPER_BUDGET
    window: int = PAPER_WINDOW
    ratio: float = PAPER_RATIO
    prompt_len: int = 128
    new_tokens: int = 8192
    policy: str = "dynts"
    policy_options: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs
    compare_eager: bool = False
    device: str | None = None
    dtype: str | None = None
    bandwidth_gbps: float | None = None  # None: measured
    fast: bool = True  # False: our eager Engine instead of the fast path
    kernel: str | None = None  # None: $DYNTS_KERNEL, else auto (FastConfig.from_environment), as for dynts eval
    graphs: bool | None = None
    check_every: int | None = None
    compile: bool = False
    head_layers: tuple[int, ...] | None = None  # None: the paper's for large models, the shipped size for small
    seed: int = 0

    def __post_init__(self):
        if self.batch is not None and self.batch < 1:
            raise DynTSError(f"--batch must be at least 1 (or 'max'), got {self.batch}")
        if self.prompt_len < 1:
            raise DynTSError(f"--prompt-len must be at least 1, got {self.prompt_len}")
        if self.new_tokens < 2:
            raise DynTSError(f"--new-tokens must be at least 2, got {self.new_tokens}")
        if self.bandwidth_gbps is not None and not self.bandwidth_gbps > 0:
            raise DynTSError(f"--bandwidth must be positive GB/s, got {self.bandwidth_gbps}")
        budget = self.budget_config()
        policy = make_policy(self.policy, budget, dict(self.policy_options))
        budget.check_prompt(self.prompt_len, policy.protects_prompt)
        FastConfig.from_environment(kernel=self.kernel, check_every=self.check_every)

    def budget_config(self) -> BudgetConfig:
        return budget_for(self.policy, self.budget, self.window, self.ratio)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def bytes_per_row(engine, capacity: int, new_tokens: int) -> int:
    """GPU memory one row of the fast path takes: what its cache allocates (K/V and every buffer the engine and the
    policy keep beside it, measured on a one-row cache on the meta device), the keep index and one layer's gathered
    keys of a compaction of every row at once, the row's generated tokens and a row of logits (and an fp32 copy)."""
    from dynts.fast.static_cache import StaticBudgetedCache

    model_config = engine.loaded.model.config
    cache = StaticBudgetedCache(engine.num_layers, 1, capacity, "meta")
    cache.add_slot_buffer("position", per_head=False, dtype=torch.long, fill=-1)
    engine.policy.setup(cache)
    cache.preallocate(model_config.num_key_value_heads, head_dim(model_config), engine.loaded.dtype)
    buffers = [*cache.slot.values()]
    for layer in cache.layers:
        buffers += [layer.keys, layer.values, *layer.slot.values(), *layer.rows.values()]
    allocated = sum(b.numel() * b.element_size() for b in buffers)
    layer = cache.layers[0]
    compaction = capacity * (8 * engine.num_layers * model_config.num_key_value_heads) + layer.keys.numel() * (
        layer.keys.element_size()
    )
    return allocated + compaction + 8 * new_tokens + 16 * model_config.vocab_size


def largest_batch(engine, config: BenchConfig, reserve_bytes: int = 3 * 2**30) -> int:
    """Rows that fit in the free GPU memory (bytes_per_row each), with `reserve_bytes` left for the activations,
    the graphs' memory pool and the kernels' workspaces. One cache at a time: the scheduler drops a run's cache
    before the next run allocates its own."""
    device = engine.device
    if device.type != "cuda":
        raise DynTSError("--batch max needs a CUDA device")
    budget = config.budget_config()
    capacity = budget.budget if budget.compresses else config.prompt_len + config.new_tokens
    per_row = bytes_per_row(engine, capacity, config.new_tokens)
    torch.cuda.empty_cache()  # blocks the allocator holds but nothing uses count as free
    free, _ = torch.cuda.mem_get_info(device)
    rows = (free - reserve_bytes) // per_row
    if rows < 1:
        raise DynTSError(f"not even one row fits: {free / 2**30:.1f} GiB free, {per_row / 2**30:.2f} GiB per row")
    return int(rows)


def build_model(config: BenchConfig):

    device = config.device or default_device()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DynTSError(f"--device {device} asked for, but no CUDA GPU is available")
    dtype = resolve_dtype(config.dtype, device)
    if config.random_weights:
        return random_model(config.shape, device=device, dtype=dtype, seed=config.seed)
    name = SHAPES[config.shape].hub_id if config.shape in SHAPES else config.shape
    return load_model(name, device=device, dtype=dtype)


def importance_head(loaded, config: BenchConfig):

    if not config.policy.startswith("dynts"):
        return None
    layers = config.head_layers or (PAPER_HEAD_LAYERS if loaded.hidden_size >= 2048 else SMALL_HEAD_LAYERS)
    return random_head(loaded.hidden_size, layers=layers, seed=config.seed).to(loaded.dtype)


def eager_transformers_loop(loaded, prompts: list[list[int]], new_tokens: int) -> dict:
    """The paper's setup: model(...) with a DynamicCache, one token per step, greedy, forced length, no eviction.
    Prompts of different lengths are left-padded and masked. Forward time is taken per step with a sync, as a
    per-token eager loop does. The one transformers baseline of `dynts bench --compare-eager` and
    benchmarks/engine_vs_hf.py."""
    from transformers import DynamicCache

    model, device = loaded.model, loaded.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    reset_peak(device)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    padded = any(len(p) < width for p in prompts)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device) if padded else None
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if padded else None
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        **loaded.with_cache(cache),
        use_cache=True,
        logits_to_keep=1,
    )
    token = out.logits[:, -1].argmax(dim=-1)
    sync()
    prefill_s = time.perf_counter() - start
    position = positions[:, -1:] if padded else None
    forward_s = 0.0
    decode_start = time.perf_counter()
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        if padded:
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
            position = position + 1
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            **loaded.with_cache(cache),
            use_cache=True,
        ).logits[:, -1]
        sync()
        forward_s += time.perf_counter() - t0
        token = logits.argmax(dim=-1)
    sync()
    decode_s = time.perf_counter() - decode_start
    tokens = len(prompts) * new_tokens
    peak, _ = peak_memory(device)
    return {
        "generated_tokens": tokens,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "forward_s": forward_s,
        "tps": tokens / decode_s,
        "tps_forward": tokens / forward_s,
        "tps_with_prefill": tokens / (decode_s + prefill_s),
        "ms_per_step": 1000 * decode_s / (new_tokens - 1),
        "peak_memory_bytes": peak,
    }


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark and return every figure (see format_report for the printed form)."""

    loaded = build_model(config)
    device = loaded.device
    bandwidth = config.bandwidth_gbps or measure_bandwidth(device)  # before the cache takes the free memory
    head = importance_head(loaded, config)
    if config.batch is None and device.type != "cuda":
        raise DynTSError("--batch max needs a CUDA device")
    batch = config.batch or 1  # --batch max: sized below, with the engine's own buffers
    budget = config.budget_config()
    sampling = SamplingConfig(greedy=True, max_new_tokens=config.new_tokens, ignore_eos=True)
    fast_config = FastConfig.from_environment(
        graphs=config.graphs, kernel=config.kernel, check_every=config.check_every, compile=config.compile
    )
    if config.fast:
        engine = FastEngine(
            loaded,
            config.policy,
            budget,
            sampling,
            batch,
            head=head,
            fast=fast_config,
            policy_options=dict(config.policy_options),
        )
    else:
        engine = Engine(
            loaded, config.policy, budget, sampling, batch, head=head, policy_options=dict(config.policy_options)
        )
    if config.batch is None:
        batch = engine.batch_size = largest_batch(engine, config)
    generator = torch.Generator().manual_seed(config.seed)
    vocab = loaded.model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, config.prompt_len), generator=generator).tolist()
    engine.sampling = replace(sampling, max_new_tokens=min(config.new_tokens, 8))  # warm-up: kernels, graphs
    warmup = engine.generate(prompts)
    warmup_profile = getattr(engine, "last_profile", None)
    warmup_compile_s = warmup_profile.compile_s if warmup_profile is not None else 0.0
    del warmup
    engine.sampling = sampling
    engine.last_cache = None  # the warm-up's cache and graphs go before the timed run allocates its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    start = time.perf_counter()
    out = engine.generate(prompts)
    total_s = time.perf_counter() - start
    peak, peak_kind = peak_memory(device)
    run = out.stats
    steps = config.new_tokens - 1
    ours = {
        "generated_tokens": run.generated_tokens,
        "prefill_s": run.prefill_time_s,
        "decode_s": run.decode_time_s,
        "forward_s": run.forward_time_s,
        "tps": run.tps,
        "tps_forward": run.tps_forward,
        "tps_with_prefill": run.generated_tokens / total_s,
        "ms_per_step": 1000 * run.decode_time_s / steps,
        "peak_memory_bytes": peak,
        "compressions": run.compressions,
    }
    profile = getattr(engine, "last_profile", None)
    if profile is not None:
        shares = profile.shares()
        ours.update(
            kernel=profile.kernel,
            graphs=profile.graphs,
            check_every=profile.check_every,
            host_reads=profile.host_reads,
            captures=profile.captures,
            capture_s=profile.capture_s,
            compiled=profile.compiled,
            compile_s=warmup_compile_s + profile.compile_s,
            fused=profile.fused,
            packed_bytes=engine.packed_bytes if profile.packed else 0,
            stage_seconds={
                "forward": profile.forward_s,
                "scoring": profile.scoring_s,
                "sampling": profile.sampling_s,
                "eviction": profile.eviction_s,
            },
            shares=shares,
            eviction_scoring_share=shares["eviction"] + shares["scoring"],
        )

    weights = streamed_weight_bytes(loaded.model, batch) + (parameter_bytes(head) if head is not None else 0)
    kv_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
    bound = roofline(weights, kv_token, batch, config.prompt_len, config.new_tokens, budget, bandwidth)
    report = {
        "shape": config.shape,
        "model_type": loaded.model.config.model_type,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "random_weights": config.random_weights,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "batch": batch,
        "budget": budget.budget,
        "window": budget.window,
        "ratio": budget.ratio,
        "prompt_len": config.prompt_len,
        "new_tokens": config.new_tokens,
        "policy": config.policy,
        "engine": "fast" if config.fast else "eager-engine",
        "head_parameters": sum(p.numel() for p in head.parameters()) if head is not None else 0,
        "peak_memory_kind": peak_kind,
        "ours": ours,
        "roofline": bound.to_dict(),
        "fraction": ours["tps"] / bound.tps_bound,
        "fraction_at_max": ours["tps"] / bound.tps_bound_at_max,
        "bandwidth_measured": config.bandwidth_gbps is None,
        "eager": None,
        "ratio_vs_eager": None,
    }
    if config.compare_eager:
        del engine, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            eager = eager_transformers_loop(loaded, prompts, config.new_tokens)
        except torch.OutOfMemoryError:
            eager = {
                "error": f"out of memory at batch {batch} with a growing cache of "
                f"{config.prompt_len + config.new_tokens} tokens"
            }
        report["eager"] = eager
        if "tps" in eager:
            full = BudgetConfig(None)
            eager_bound = roofline(
                streamed_weight_bytes(loaded.model, batch),
                kv_token,
                batch,
                config.prompt_len,
                config.new_tokens,
                full,
                bandwidth,
            )
            eager["tps_bound"] = eager_bound.tps_bound
            eager["fraction"] = eager["tps"] / eager_bound.tps_bound
            report["ratio_vs_eager"] = {
                "tps": ours["tps"] / eager["tps"],
                "tps_forward": ours["tps_forward"] / eager["tps_forward"],
            }
    return report


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(r: dict) -> str:
    """The human-readable form of run_bench's result."""
    ours, bound, eager = r["ours"], r["roofline"], r["eager"]
    budget = f"B={r['budget']} W={r['window']} r={r['ratio']}" if r["budget"] else "no budget"
    weights = "random weights" if r["random_weights"] else "real weights"
    lines = [
        f"dynts bench: {r['shape']} ({r['model_type']}, {r['parameters'] / 1e9:.3f}B parameters, {weights}), "
        f"{r['dtype']} on {r['device_name']} ({r['torch_threads']} torch threads)",
        f"batch {r['batch']}, prompt {r['prompt_len']}, {r['new_tokens']} new tokens per sequence, policy "
        f"{r['policy']} {budget}",
    ]
    if "kernel" in ours:
        lines.append(
            f"fast path: attention kernel {ours['kernel']}, CUDA graphs {'on' if ours['graphs'] else 'off'}"
            f" ({ours['captures']} captures, {ours['capture_s']:.2f} s), host reads every "
            f"{ours['check_every']} steps ({ours['host_reads']} reads)"
        )
        lines.append(
            f"forward stage: {'fused decoder' if ours['fused'] else 'the model forward'}, "
            + (f"compiled ({ours['compile_s']:.1f} s compiling, in the warm-up)" if ours["compiled"] else "eager")
            + (
                f", packed weights (a {_gib(ours['packed_bytes'])} second copy of the decode weights)"
                if ours["packed_bytes"]
                else ""
            )
        )
    else:
        lines.append("engine: the eager budgeted Engine (--eager-engine)")
    width = 34
    header = f"{'':{width}}{'ours':>14}"
    if eager and "tps" in eager:
        header += f"{'transformers eager':>22}{'ratio':>10}"
    lines += ["", header]

    def row(label, key, fmt, ratio=False):
        text = f"{label:{width}}{format(ours[key], fmt):>14}"
        if eager and "tps" in eager:
            text += f"{format(eager[key], fmt):>22}"
            if ratio:
                text += f"{ours[key] / eager[key]:>9.2f}x"
        return text

    lines += [
        row("end-to-end TPS (decode)", "tps", ".1f", True),
        row("forward-only TPS", "tps_forward", ".1f", True),
        row("TPS with prefill", "tps_with_prefill", ".1f", True),
        row("ms per step", "ms_per_step", ".3f"),
        f"{'peak memory (' + r['peak_memory_kind'] + ')':{width}}{_gib(ours['peak_memory_bytes']):>14}"
        + (f"{_gib(eager['peak_memory_bytes']):>22}" if eager and "tps" in eager else ""),
    ]
    if eager and "error" in eager:
        lines.append(f"transformers eager: {eager['error']}")
    source = "measured" if r["bandwidth_measured"] else "given"
    lines += [
        "",
        f"roofline: bytes/step = weights {bound['weight_bytes'] / 1e9:.3f} GB + {r['batch']} rows x "
        f"{bound['mean_cached_tokens']:.0f} cached tokens (mean over the run) x {bound['kv_bytes_per_token']} B/token"
        f" = {bound['bytes_per_step'] / 1e9:.3f} GB",
        f"bandwidth {bound['bandwidth_gbps']:.0f} GB/s ({source}) -> bound {bound['tps_bound']:.1f} TPS; "
        f"measured {ours['tps']:.1f} TPS = {r['fraction']:.1%} of the bound",
        f"(with every row at {bound['max_cached_tokens']} cached tokens, the worst case: bound "
        f"{bound['tps_bound_at_max']:.1f} TPS, fraction {r['fraction_at_max']:.1%})",
    ]
    if eager and "fraction" in eager:
        lines.append(
            f"transformers eager vs its own bound (growing cache, no eviction): {eager['tps_bound']:.1f} "
            f"TPS, fraction {eager['fraction']:.1%}"
        )
    if "shares" in ours:
        s = ours["shares"]
        lines.append(
            f"step time: forward {s['forward']:.1%}, scoring {s['scoring']:.1%}, sampling "
            f"{s['sampling']:.1%}, eviction {s['eviction']:.1%} (eviction + scoring "
            f"{ours['eviction_scoring_share']:.1%}); {ours['compressions']} compressions"
        )
    return "\n".join(lines)


def parse_batch(text: str) -> int | None:
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        raise DynTSError(f"--batch takes a number of sequences or 'max', got {text!r}") from None
