"""The attention function DynTS registers with transformers' AttentionInterface.

It masks by per-sequence cache lengths (the engine passes the mask in a `dynts_ctx` keyword that transformers
forwards to attention functions) and shows queries and attention probabilities to the policy that asked for
them. Called without a context it behaves exactly like transformers' SDPA attention, so a model set to
"dynts" still works with `generate` and anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_NAME = "dynts"


@dataclass
class StepContext:
    """What one forward of the engine tells the attention function.

    mask: [batch, 1, 1, kv_len] bool for decode steps (None: every row is full length), unused at prefill.
    prefill_row: the cache row a prefill writes: a run of tokens appended after the row's cached ones (a prompt,
        or a teacher-forced chunk), causal, unpadded, one row at a time.
    observer: a policy that wants queries / attention probabilities (see Policy.observe_attention).
    cache: the BudgetedCache being written, for observers that keep per-layer state in it.
    positions: original positions of the new tokens: [batch] at decode steps, [q] at prefill.
    """

    mask: torch.Tensor | None = None
    prefill_row: int | None = None
    observer: Any = None
    cache: Any = None
    positions: torch.Tensor | None = None


def _grouped(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[b, H, q, d] -> [b, kvh, H/kvh * q, d]: the query heads that share a KV head, stacked (decode only)."""
    b, h, q, d = query.shape
    return query.reshape(b, num_kv_heads, (h // num_kv_heads) * q, d)


def attention_probs(query, key, mask, scaling, causal: bool) -> torch.Tensor:
    """Softmax attention probabilities [b, kvh, groups, q, kv] without repeating K across query heads."""
    b, h, q, d = query.shape
    kvh, kv = key.shape[1], key.shape[2]
    qg = query.reshape(b, kvh, h // kvh, q, d)
    scores = torch.matmul(qg, key.unsqueeze(2).transpose(-1, -2)).float() * scaling
    if causal:
        offset = kv - q
        allowed = torch.arange(kv, device=key.device)[None, :] <= (torch.arange(q, device=key.device)[:, None] + offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    return scores.softmax(dim=-1)


def dynts_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx: StepContext | None = kwargs.pop("dynts_ctx", None)
    if ctx is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    prefill = ctx.prefill_row is not None
    observer = ctx.observer
    probs = None
    if observer is not None and observer.wants_probs:
        probs = attention_probs(query, key, None if prefill else ctx.mask, scaling, causal=prefill)
    if observer is not None:
        observer.observe_attention(module.layer_idx, query, key, probs, ctx)

    b, h, q, d = query.shape
    kvh = key.shape[1]
    if probs is not None:
        qg = probs.to(value.dtype)  # [b, kvh, g, q, kv]
        out = torch.matmul(qg, value.unsqueeze(2)).reshape(b, h, q, d)
    elif prefill and q == key.shape[2]:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q > 1, scale=scaling, enable_gqa=kvh != h)
    elif prefill:  # a chunk after cached tokens: query i sees every cached key and the chunk up to itself
        kv = key.shape[2]
        allowed = torch.arange(kv, device=key.device)[None, :] <= torch.arange(kv - q, kv, device=key.device)[:, None]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=kvh != h)
    else:
        # Decode: fold the query heads of a group into the query axis, so K/V are read once per KV head.
        mask = ctx.mask
        out = F.scaled_dot_product_attention(_grouped(query, kvh), key, value, attn_mask=mask, scale=scaling)
        out = out.reshape(b, h, q, d)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention and mask functions under one name (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, dynts_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def use_dynts_attention(model) -> None:
    """Run `model` with the DynTS attention function from now on (idempotent). Without a `dynts_ctx` it computes
    exactly what SDPA does, so the model stays usable by anything else."""
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(register())
