"""Next-token choice that a CUDA graph can hold: greedy argmax, or sampling with counter-based noise.

A captured step can't draw from per-sequence torch.Generators, so the noise is a hash of (sequence seed, token
index, candidate): deterministic per sequence, independent of what else shares the batch, and computed on the
device with integer ops. Sampling is the Gumbel-max trick over the protocol's filtered distribution
(temperature -> top-k -> top-p, the rules of engine/sampling.py). The distribution equals the eager sampler's;
the random stream does not, so sampled (non-greedy) texts differ between the two paths.
"""

from __future__ import annotations

import torch

from dynts.config import SamplingConfig
from dynts.engine.sampling import nucleus_drop, top_k_count

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for int64 x in [0, 2^32), without int64 overflow (split c in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_words(seeds: list[int], device) -> torch.Tensor:
    """Per-sequence seeds reduced to 32 bits on the host, once per batch."""
    return torch.tensor([int(s) & MASK32 for s in seeds], dtype=torch.long, device=device)


def uniform_noise(seeds: torch.Tensor, step: torch.Tensor, count: int) -> torch.Tensor:
    """[n, count] uniforms in (0, 1) from (seed of row, token index `step` (0-dim tensor), candidate index)."""
    candidates = torch.arange(count, device=seeds.device, dtype=torch.long)
    row_key = mix32(seeds ^ mix32((step + 0x9E3779B9) & MASK32))  # [n]
    bits = mix32(row_key[:, None] ^ mix32((candidates + 0x85EBCA6B) & MASK32)[None, :])
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def choose_tokens(
    logits: torch.Tensor, config: SamplingConfig, seeds: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """logits [n, vocab] -> token ids [n], with no host sync."""
    if config.greedy:
        return logits.argmax(dim=-1)
    k = top_k_count(config, logits.shape[-1])
    values, ids = (logits.float() / config.temperature).topk(k, dim=-1)  # sorted, best first
    if config.top_p < 1.0:
        values = values.masked_fill(nucleus_drop(values, config.top_p), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, step, k)))
    pick = (values + gumbel).argmax(dim=-1, keepdim=True)
    return ids.gather(1, pick)[:, 0]
