"""How sure a Pass@1 is: bootstrap intervals, and a paired bootstrap and permutation test for two runs.

A benchmark of 30 problems with 5 samples each carries two kinds of noise: which problems the benchmark happens
to hold (one problem is 3.3 points of Pass@1), and which completions the sampler produced for each. The
bootstrap here resamples both: problems with replacement, then, within each drawn problem, its samples with
replacement; the statistic is Pass@1 itself (the mean over problems of a problem's mean accuracy). The interval
is the percentile interval of the replicates.

Verdicts are 0/1, so resampling a problem's n samples (c correct) with replacement draws Binomial(n, c / n)
correct ones: the inner level is drawn from that distribution directly, which is the same distribution as
resampling sample by sample, without materialising it.

Seeded: every dataset's replicates come from a generator seeded by (seed, dataset name, purpose), so a dataset's
interval depends only on its own verdicts and the seed, and the same run always gives the same interval. The
interval of the mean over datasets averages the datasets' replicates, replicate by replicate.

Paired comparisons (two runs on the same problems): the bootstrap draws one set of problems for both runs and
each run's samples within them independently; the permutation test randomly swaps the two runs' values of each
problem (flips the sign of its difference), exactly over every swap pattern when at most
`EXACT_PERMUTATION_LIMIT` problems differ, else over `permutations` seeded random patterns; its p-value is
two-sided.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dynts.config import DEFAULT_PERMUTATIONS, DEFAULT_RESAMPLES, DEFAULT_SEED
from dynts.errors import DynTSError

CONFIDENCE = 0.95
EXACT_PERMUTATION_LIMIT = 16  # at most 2**16 sign patterns are enumerated exactly
METHOD = "bootstrap over problems, then over each problem's samples; percentile interval"

# What a generator's draws are for (one stream each, so adding one never shifts another).
PASS1_STREAM, PAIRED_STREAM, PERMUTATION_STREAM = 0, 1, 2


@dataclass(frozen=True)
class BootstrapConfig:
    """resamples: bootstrap replicates; seed: fixed, so a run's intervals never change; confidence: e.g. 0.95;
    permutations: random swap patterns of the paired test when there are too many to enumerate."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    confidence: float = CONFIDENCE
    permutations: int = DEFAULT_PERMUTATIONS

    def __post_init__(self):
        for name in ("resamples", "seed", "permutations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DynTSError(f"bootstrap {name} must be an integer, got {value!r}")
        if self.resamples < 100:
            raise DynTSError(f"bootstrap resamples must be at least 100, got {self.resamples}")
        if self.permutations < 100:
            raise DynTSError(f"permutations must be at least 100, got {self.permutations}")
        if self.seed < 0:
            raise DynTSError(f"the bootstrap seed must be non-negative, got {self.seed}")
        if not 0.5 <= self.confidence < 1:
            raise DynTSError(f"the confidence level must be in [0.5, 1), got {self.confidence}")

    @property
    def percent(self) -> str:
        """The confidence level as a label: "95%"."""
        return f"{100 * self.confidence:g}%"

    def to_dict(self) -> dict:
        return {**asdict(self), "method": METHOD}


@dataclass(frozen=True)
class Verdicts:
    """One dataset's verdicts as counts: per problem, n samples of which c were correct."""

    n: np.ndarray
    c: np.ndarray

    @classmethod
    def from_lists(cls, per_problem: Sequence[Sequence[bool]]) -> Verdicts:
        if not per_problem or any(len(samples) == 0 for samples in per_problem):
            raise DynTSError("the bootstrap needs at least one problem, each with at least one sample")
        n = np.array([len(samples) for samples in per_problem], dtype=np.int64)
        c = np.array([sum(bool(v) for v in samples) for samples in per_problem], dtype=np.int64)
        return cls(n, c)

    @property
    def accuracy(self) -> np.ndarray:
        """Per problem, its mean accuracy."""
        return self.c / self.n

    @property
    def pass1(self) -> float:
        return float(np.mean(self.accuracy))


def generator(seed: int, name: str, stream: int = PASS1_STREAM) -> np.random.Generator:
    """The generator for one dataset's draws of one kind: depends on the seed, the name and the stream only."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), stream])


def bootstrap_pass1(verdicts: Verdicts, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Pass@1 replicates: problems resampled with replacement, then each drawn problem's samples."""
    count = len(verdicts.n)
    drawn = rng.integers(0, count, size=(resamples, count))
    return _resampled_accuracy(verdicts, drawn, rng).mean(axis=1)


def interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central percentile interval of the replicates."""
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(np.asarray(replicates, dtype=float), [tail, 1.0 - tail])
    return float(lo), float(hi)


def pass1_intervals(
    by_dataset: Mapping[str, Verdicts], config: BootstrapConfig
) -> tuple[dict[str, tuple[float, float]], tuple[float, float] | None]:
    """Per dataset its Pass@1 interval, and the interval of the unweighted mean over datasets (None: no data)."""
    replicates = {
        name: bootstrap_pass1(verdicts, config.resamples, generator(config.seed, name))
        for name, verdicts in sorted(by_dataset.items())
    }
    per_dataset = {name: interval(values, config.confidence) for name, values in replicates.items()}
    if not replicates:
        return per_dataset, None
    mean = np.mean(np.stack(list(replicates.values())), axis=0)
    return per_dataset, interval(mean, config.confidence)


def paired_bootstrap(baseline: Verdicts, other: Verdicts, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates of Pass@1(other) - Pass@1(baseline) on paired problems (index i is one problem in both)."""
    if len(baseline.n) != len(other.n) or len(baseline.n) == 0:
        raise DynTSError("a paired bootstrap needs the same, non-empty list of problems in both runs")
    count = len(baseline.n)
    drawn = rng.integers(0, count, size=(resamples, count))
    return (_resampled_accuracy(other, drawn, rng) - _resampled_accuracy(baseline, drawn, rng)).mean(axis=1)


def paired_permutation_pvalue(differences: Sequence[np.ndarray], permutations: int, rng: np.random.Generator) -> float:
    """Two-sided p-value of "the runs do not differ" from per-problem differences (one array per dataset).

    The statistic is the mean over datasets of the mean difference over a dataset's problems; a swap of a
    problem's two values flips the sign of its difference."""
    arrays = [np.asarray(d, dtype=float) for d in differences]
    if not arrays or any(d.size == 0 for d in arrays):
        raise DynTSError("a permutation test needs at least one paired problem in every dataset it covers")
    weights = np.concatenate([np.full(d.size, 1.0 / (d.size * len(arrays))) for d in arrays])
    terms = weights * np.concatenate(arrays)
    terms = terms[terms != 0]
    if terms.size == 0:
        return 1.0
    observed = abs(float(terms.sum()))
    tolerance = 1e-9 * float(np.abs(terms).max())
    if terms.size <= EXACT_PERMUTATION_LIMIT:
        patterns = (np.arange(2**terms.size)[:, None] >> np.arange(terms.size)) & 1
        statistics = np.abs((1 - 2 * patterns) @ terms)
        return float(np.mean(statistics >= observed - tolerance))
    signs = rng.integers(0, 2, size=(permutations, terms.size)) * 2 - 1
    statistics = np.abs(signs @ terms)
    return float((1 + np.sum(statistics >= observed - tolerance)) / (1 + permutations))


def _resampled_accuracy(verdicts: Verdicts, drawn: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per replicate and drawn problem, the mean accuracy of its samples resampled with replacement."""
    n = verdicts.n[drawn]
    return rng.binomial(n, verdicts.c[drawn] / n) / n


__all__ = [
    "BootstrapConfig",
    "Verdicts",
    "bootstrap_pass1",
    "generator",
    "interval",
    "paired_bootstrap",
    "paired_permutation_pvalue",
    "pass1_intervals",
]
