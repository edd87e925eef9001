"""The training objective of the importance head: the label transform, the heavy band and its weights, the
weighted MSE, one optimiser step and the learning-rate schedule (train.py's docstring: Fit).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dynts.errors import DynTSError

HEAVY_WEIGHT = 5.0


HEAVY_RANGE = (4.0, 5.0)  # the paper's band of transformed label values, sized for 10k-token R1 traces


def parse_transform(spec: str) -> Callable:
    """The label transform named by `spec`: "scale:S" -> y = S*x, "pow:P" -> y = 10*x^P/P, "rank:S" -> y = S times
    each label's rank quantile within its trace (0 the lowest, 1 the highest; tied labels share their mean rank).

    The returned function is called as fn(labels, counts=None): counts are the rows of each consecutive trace in
    `labels` (None: one trace). scale and pow work elementwise, on floats and on tensors; rank works per trace, on
    tensors. Why rank: a label is a mean attention, about 1/L, so its scale moves with trace length and style, which
    a head fitted on raw values must learn from its features; a rank quantile is the same at any length, and a
    compression's top-k only ever compares tokens of one trace.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise DynTSError(
            f"label transform must be 'scale:S', 'pow:P' or 'rank:S' (e.g. scale:10000, pow:0.3, rank:10), got {spec!r}"
        )
    kind, _, value = spec.partition(":")
    kind = kind.strip().lower()
    try:
        number = float(value)
    except ValueError:
        raise DynTSError(f"label transform {spec!r}: {value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise DynTSError(f"label transform {spec!r}: the parameter must be a positive finite number")
    if kind == "scale":
        return lambda x, counts=None: x * number
    if kind == "pow":
        return lambda x, counts=None: 10.0 * x**number / number
    if kind == "rank":
        return lambda x, counts=None: number * trace_rank_quantiles(x, counts)
    raise DynTSError(f"unknown label transform {kind!r} in {spec!r}: use 'scale:S', 'pow:P' or 'rank:S'")


def trace_rank_quantiles(labels: torch.Tensor, counts=None) -> torch.Tensor:
    """Each label's mean rank within its trace over (rows - 1), in [0, 1] (a one-row trace: 0.5); counts as in
    parse_transform."""
    labels = torch.as_tensor(labels)
    counts = [labels.numel()] if counts is None else [int(n) for n in counts]
    if sum(counts) != labels.numel() or any(n < 0 for n in counts):
        raise DynTSError(f"rank transform: trace row counts sum to {sum(counts)}, the labels have {labels.numel()}")
    out = torch.empty(labels.shape, dtype=torch.float32)
    for segment, target in zip(labels.flatten().split(counts), out.view(-1).split(counts)):
        if segment.numel() == 1:
            target.fill_(0.5)
            continue
        ordered = segment.sort().values
        below = torch.searchsorted(ordered, segment, right=False)
        up_to = torch.searchsorted(ordered, segment, right=True)
        target.copy_((below + up_to - 1).float() / 2 / (segment.numel() - 1))
    return out.to(labels.device)


def parse_band(spec: str) -> tuple[str, float, float]:
    """The heavy-weight band named by `spec`: ("quantile", LO, HI) or ("value", LO, HI).

    quantile:LO[:HI]  the transformed training labels between their LO and HI quantiles (HI defaults to 1: the
                      top 1 - LO of the labels), whatever the trace lengths and transform;
    value:LO:HI       transformed labels in [LO, HI) (value:4:5 is the paper's band);
    none              no heavy weight (plain MSE).
    """
    text = str(spec).strip().lower() if spec is not None else ""
    if text == "none":
        return ("value", math.inf, math.inf)
    kind, _, rest = text.partition(":")
    try:
        numbers = [float(x) for x in rest.split(":")] if rest else []
    except ValueError:
        numbers = []
    if kind == "quantile" and len(numbers) == 1:
        numbers.append(1.0)
    ok = len(numbers) == 2 and all(math.isfinite(x) for x in numbers) and numbers[0] < numbers[1]
    if kind == "quantile" and ok and 0.0 <= numbers[0] and numbers[1] <= 1.0:
        return ("quantile", numbers[0], numbers[1])
    if kind == "value" and ok:
        return ("value", numbers[0], numbers[1])
    raise DynTSError(
        f"loss band must be quantile:LO[:HI] (0 <= LO < HI <= 1), value:LO:HI (LO < HI) or none, got {spec!r}"
    )


def band_limits(spec: str, targets: torch.Tensor) -> tuple[float, float]:
    """[low, high) in transformed-label values: a value band as given, a quantile band from `targets`."""
    kind, low, high = parse_band(spec)
    if kind == "value":
        return low, high
    ordered = targets.detach().flatten().double().sort().values
    if ordered.numel() == 0:
        raise DynTSError("a quantile loss band needs training labels")
    at = lambda q: float(ordered[min(ordered.numel() - 1, int(math.floor(q * ordered.numel())))])
    return at(low), (math.inf if high >= 1.0 else at(high))


def loss_weights(target: torch.Tensor, band: tuple[float, float] = HEAVY_RANGE, weight: float = HEAVY_WEIGHT):
    """`weight` where the transformed label lies in [band[0], band[1]), else 1."""
    low, high = band
    heavy = (target >= low) & (target < high)
    return torch.where(heavy, torch.full_like(target, weight), torch.ones_like(target))


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, band: tuple[float, float] = HEAVY_RANGE, weight: float = HEAVY_WEIGHT
) -> torch.Tensor:
    """mean(w * (pred - target)^2) with w from `loss_weights` (on the transformed labels)."""
    return (loss_weights(target, band, weight) * (pred - target) ** 2).mean()


def train_step(head, optimizer, features, targets, band, weight: float = HEAVY_WEIGHT, clip_norm=None):
    """One optimizer step on a minibatch; returns (loss, gradient norm before clipping).

    clip_norm: rescale the gradients to this total norm when they exceed it (None: no clipping)."""
    loss = weighted_mse(head(features.float()), targets, band, weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in head.parameters() if p.grad is not None]
    if clip_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    optimizer.step()
    return float(loss.detach()), float(norm)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
