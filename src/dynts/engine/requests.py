"""A request to decode: what the scheduler takes in, and what it hands back with each result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dynts.config import SamplingParams
from dynts.errors import DynTSError


@dataclass(frozen=True)
class Request:
    """One sequence to decode.

    prompt_ids: the prompt, already tokenized (chat template applied).
    seed: seeds this sequence's sampler, so its samples depend on nothing else in the batch (None: sampling.seed,
        or the engine's seed when the request brings no sampling params).
    key: the caller's name for it (an index, a (dataset, id, sample) triple, ...), returned with its result.
    forced: teacher forcing: the tokens to emit instead of sampling (the sequence ends after the last).
    sampling: this request's own sampling params (None: the engine's).
    budget: this request's own KV budget b <= the engine's B (None: B); it compresses at b, with the window
        scaled to W * b / B and the engine's ratio (BudgetConfig.scaled).
    """

    prompt_ids: tuple[int, ...]
    seed: int | None = None
    key: Any = None
    forced: tuple[int, ...] | None = None
    sampling: SamplingParams | None = None
    budget: int | None = None

    def __post_init__(self):
        if not self.prompt_ids:
            raise DynTSError(f"request {self.key!r} has an empty prompt")
        if self.forced is not None and not self.forced:
            raise DynTSError(f"request {self.key!r}: forced needs at least one token")
        if self.sampling is not None and not isinstance(self.sampling, SamplingParams):
            raise DynTSError(f"request {self.key!r}: sampling must be SamplingParams, got {type(self.sampling)}")
        if self.sampling is not None and self.seed is not None and self.seed != self.sampling.seed:
            raise DynTSError(
                f"request {self.key!r}: seed {self.seed} differs from sampling.seed {self.sampling.seed}; give it once"
            )

    @classmethod
    def of(
        cls,
        prompt_ids: Sequence[int],
        seed: int | None = None,
        key: Any = None,
        forced: Sequence[int] | None = None,
        sampling: SamplingParams | None = None,
        budget: int | None = None,
    ) -> Request:
        return cls(
            tuple(int(t) for t in prompt_ids),
            None if seed is None else int(seed),
            key,
            None if forced is None else tuple(forced),
            sampling,
            budget,
        )
