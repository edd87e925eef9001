"""How long the generations were, and how often they ran into `max_new_tokens`.

Eviction can lengthen reasoning (a model that loses its work re-derives it), so a policy's length distribution
and its truncation rate matter beside its accuracy and speed: a truncated sample has no final answer and costs
the whole generation budget.

* mean / median / p90 generated tokens over the samples that recorded a length (p90: numpy's linear
  interpolation between order statistics).
* truncation rate: the share of samples whose finish_reason is "length" (stopped by `max_new_tokens`), over
  the samples that recorded a finish reason; None when none did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from dynts.harness.records import figure

TRUNCATED = "length"
LENGTH_KEYS = ("mean_generated_tokens", "median_generated_tokens", "p90_generated_tokens", "truncation_rate")


def generated_tokens(record: dict) -> float | None:
    """A sample's generated length (records.figure: stats, else an older record's own field)."""
    return _number(figure(record, "generated_tokens"))


def finish_reason(record: dict) -> str | None:
    """Why a sample stopped ("eos" or "length"), read as generated_tokens is."""
    value = figure(record, "finish_reason")
    return None if value is None else str(value)


def length_stats(records: Iterable[dict]) -> dict:
    """mean/median/p90 generated tokens and the truncation rate of some samples (None where nothing recorded)."""
    records = list(records)
    lengths = np.array([x for x in map(generated_tokens, records) if x is not None], dtype=float)
    reasons = [r for r in map(finish_reason, records) if r is not None]
    return {
        "mean_generated_tokens": float(lengths.mean()) if lengths.size else None,
        "median_generated_tokens": float(np.median(lengths)) if lengths.size else None,
        "p90_generated_tokens": float(np.quantile(lengths, 0.9)) if lengths.size else None,
        "truncation_rate": sum(r == TRUNCATED for r in reasons) / len(reasons) if reasons else None,
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


__all__ = ["LENGTH_KEYS", "TRUNCATED", "finish_reason", "generated_tokens", "length_stats"]
