"""A request to decode: what the scheduler takes in, and what it hands back with each result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dynts.errors import DynTSError


@dataclass(frozen=True)
class Request:
    """One sequence to decode.

    prompt_ids: the prompt, already tokenized (chat template applied).
    seed: seeds this sequence's sampler, so its samples depend on nothing else in the batch.
    key: the caller's name for it (an index, a (dataset, id, sample) triple, ...), returned with its result.
    forced: teacher forcing: the tokens to emit instead of sampling (the sequence ends after the last).
    """

    prompt_ids: tuple[int, ...]
    seed: int
    key: Any = None
    forced: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.prompt_ids:
            raise DynTSError(f"request {self.key!r} has an empty prompt")
        if self.forced is not None and not self.forced:
            raise DynTSError(f"request {self.key!r}: forced needs at least one token")

    @classmethod
    def of(cls, prompt_ids: Sequence[int], seed: int, key: Any = None, forced: Sequence[int] | None = None) -> Request:
        return cls(tuple(int(t) for t in prompt_ids), int(seed), key, None if forced is None else tuple(forced))
