"""Decode attention for the static fast path: one query per sequence over a fixed-capacity cache.

The fast path keeps every step's shapes fixed (batch x capacity), so the question is only how much of the
capacity a kernel reads:
- "sdpa": the portable default, the engine's own attention with a length mask over the whole capacity
  (reads batch x capacity; runs everywhere, and is what policies that need attention probabilities use);
- "triton": our split-K kernel (triton_decode.py), reading only each sequence's own length;
- "flash": flash-attn's `flash_attn_with_kvcache(cache_seqlens=...)`, same idea, when flash-attn is installed.
"auto" picks flash, then triton, on CUDA, and sdpa elsewhere. Which is fastest is measured by `dynts bench
--kernel ...` (benchmarks/gpu_probe.sh).

The function registered here is a superset of the engine's: without a StaticStepContext (prefill, the eager
engine, plain transformers calls) it does exactly what `dynts_attention` does.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from dynts.config import KERNELS
from dynts.errors import DynTSError
from dynts.fast import triton_decode
from dynts.kv.attention import StepContext, dynts_attention

ATTENTION_NAME = "dynts-static"


def _flash_with_kvcache():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def resolve_kernel(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel `name` stands for on this device, or a DynTSError saying why it can't run here."""
    if name not in KERNELS:
        raise DynTSError(f"unknown decode attention kernel {name!r}; choose one of {', '.join(KERNELS)}")
    cuda = device.type == "cuda"
    flash_ok = cuda and dtype in (torch.float16, torch.bfloat16) and _flash_with_kvcache() is not None
    if name == "auto":
        return "flash" if flash_ok else "triton" if cuda and triton_decode.available() else "sdpa"
    if name == "flash" and not flash_ok:
        raise DynTSError("--kernel flash needs CUDA, fp16/bf16 and the flash-attn package")
    if name == "triton" and not (triton_decode.available() and (cuda or triton_decode.interpreted())):
        raise DynTSError("--kernel triton needs the triton package and CUDA (or TRITON_INTERPRET=1 on a CPU)")
    return name


@dataclass
class StaticStepContext(StepContext):
    """A decode step of the static path: kv_lengths [batch] = cached tokens per row including the new one."""

    kv_lengths: torch.Tensor | None = None
    kernel: str = "sdpa"


def length_aware_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_lengths: torch.Tensor, scale: float, kernel: str
) -> torch.Tensor:
    """query [b, H, d] over key/value [b, kvh, capacity, d] limited to kv_lengths -> [b, H, d]."""
    if kernel == "triton":
        return triton_decode.split_k_decode(query, key, value, kv_lengths, scale)
    if kernel == "flash":
        out = _flash_with_kvcache()(
            query[:, None],
            key.transpose(1, 2),
            value.transpose(1, 2),
            cache_seqlens=kv_lengths.to(torch.int32),
            softmax_scale=scale,
            causal=False,
        )
        return out[:, 0]
    raise ValueError(f"no length-aware kernel {kernel!r}")


def check_kernel(
    kernel: str, rows: int, heads: int, kv_heads: int, head_dim: int, capacity: int, dtype, device
) -> str | None:
    """Run `kernel` once against SDPA at the real shapes and dtype, with lengths that differ per row; None when
    it agrees, else why not (it raised, or its output differs beyond the dtype's tolerance). Where the inputs
    at `rows` rows do not fit in memory (the largest batch), it is checked at a quarter of the rows, and so on."""
    if kernel == "sdpa":
        return None
    while True:
        try:
            return _compare_with_sdpa(kernel, rows, heads, kv_heads, head_dim, capacity, dtype, device)
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if rows == 1:
                return f"out of memory checking it at 1 row of {capacity} slots"
            rows = max(1, rows // 4)


def _compare_with_sdpa(kernel, rows, heads, kv_heads, head_dim, capacity, dtype, device) -> str | None:
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    query, key, value = (
        randn(rows, heads, head_dim),
        randn(rows, kv_heads, capacity, head_dim),
        randn(rows, kv_heads, capacity, head_dim),
    )
    lengths = torch.linspace(1, capacity, rows).long().to(device)
    scale = head_dim**-0.5
    try:
        got = length_aware_attention(query, key, value, lengths, scale, kernel)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 (any failure of an optional kernel falls back to sdpa)
        return f"it raised {type(exc).__name__}: {exc}"
    group, errors = heads // kv_heads, []
    for first in range(0, rows, 8):  # the fp32 reference a few rows at a time: a fraction of the inputs' memory
        part = slice(first, first + 8)
        n = query[part].shape[0]
        mask = (torch.arange(capacity, device=device)[None, :] < lengths[part, None])[:, None, None, :]
        expected = F.scaled_dot_product_attention(
            query[part].float().reshape(n, kv_heads, group, head_dim),
            key[part].float(),
            value[part].float(),
            attn_mask=mask,
            scale=scale,
        ).reshape(n, heads, head_dim)
        errors.append((got[part].float() - expected).abs().max())
    error = torch.stack(errors).max().item()  # NaN stays NaN
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        return f"its output differs from SDPA by {error:.3g} (tolerance {tolerance})"
    return None


def static_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx = kwargs.get("dynts_ctx")
    observer = getattr(ctx, "observer", None)
    needs_probs = observer is not None and observer.wants_probs
    if not isinstance(ctx, StaticStepContext) or ctx.kernel == "sdpa" or needs_probs:
        return dynts_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if observer is not None:
        observer.observe_attention(module.layer_idx, query, key, None, ctx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = length_aware_attention(query[:, :, 0], key, value, ctx.kv_lengths, scale, ctx.kernel)
    return out[:, None], None  # [b, q=1, H, d], as attention functions return


def register() -> str:
    """Register under its own name (idempotent); the engine's "dynts" registration is left alone."""
    AttentionInterface.register(ATTENTION_NAME, static_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


@contextmanager
def static_attention(model):
    """Run `model` with the static-path attention inside the block, and put its own back afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(register())
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
