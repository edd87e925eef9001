"""When a sequence stops: the one rule both decode paths apply to every token they record."""

from __future__ import annotations


def stop_reason(
    token: int, generated: int, eos: frozenset[int] | set[int], limit: int, stops: frozenset[int] = frozenset()
) -> str | None:
    """Why a sequence ends with `token`, its `generated`-th token: "eos" (an end-of-sequence token), "stop" (one of
    the request's stop tokens), "length" (max_new_tokens reached), or None (it goes on)."""
    if token in eos:
        return "eos"
    if token in stops:
        return "stop"
    if generated >= limit:
        return "length"
    return None
