"""Next-token choice that a CUDA graph can hold: greedy argmax, or sampling with counter-based noise.

A captured step can't draw from per-sequence torch.Generators, so the noise is a hash of (sequence seed, token
index, candidate): deterministic per sequence, independent of what else shares the batch, and computed on the
device with integer ops. Sampling is the Gumbel-max trick over the protocol's filtered distribution
(temperature -> top-k -> top-p, the rules of engine/sampling.py). The distribution equals the eager sampler's;
the random stream does not, so sampled (non-greedy) texts differ between the two paths.

Per-request params (RowSampling): each row's greedy flag, temperature, top-p and top-k live in device tensors the
captured sampler reads in place; the candidates are the engine's top-k (its count is a shape), so a row's own
top-k can only narrow them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class RowSampling:
    """Each row's own sampling params, [n] device tensors each (the rows of a DecodeState)."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float32 (1 for a greedy row: never divided by 0)
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # long: candidates kept, at most the engine's top-k count


def choose_tokens(
    logits: torch.Tensor,
    config: SamplingConfig,
    seeds: torch.Tensor,
    step: torch.Tensor,
    rows: RowSampling | None = None,
) -> torch.Tensor:
    """logits [n, vocab] -> token ids [n], with no host sync. rows: per-row params (the candidate count is still
    config's top-k); None: config's for every row."""
    if rows is None and config.greedy:
        return logits.argmax(dim=-1)
    k = top_k_count(config, logits.shape[-1])
    scale = config.temperature if rows is None else rows.temperature[:, None]
    values, ids = (logits.float() / scale).topk(k, dim=-1)  # sorted, best first
    if rows is not None:
        beyond = torch.arange(k, device=logits.device)[None, :] >= rows.top_k[:, None]
        nucleus = nucleus_drop(values.masked_fill(beyond, float("-inf")), rows.top_p[:, None])
        values = values.masked_fill(beyond | (nucleus & (rows.top_p < 1.0)[:, None]), float("-inf"))
    elif config.top_p < 1.0:
        values = values.masked_fill(nucleus_drop(values, config.top_p), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, step, k)))
    pick = (values + gumbel).argmax(dim=-1, keepdim=True)
    tokens = ids.gather(1, pick)[:, 0]
    return tokens if rows is None else torch.where(rows.greedy, logits.argmax(dim=-1), tokens)
