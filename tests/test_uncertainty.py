"""Bootstrap intervals and the paired tests: coverage on synthetic verdicts, determinism, exact edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynts.errors import DynTSError
from dynts.harness.uncertainty import (
    BootstrapConfig,
    Verdicts,
    bootstrap_pass1,
    generator,
    interval,
    paired_bootstrap,
    paired_permutation_pvalue,
    pass1_intervals,
)


def simulated_verdicts(rng: np.random.Generator, problems: int = 30, samples: int = 5) -> Verdicts:
    """Problems whose own rates are drawn from Beta(2, 3) (population rate 0.4), `samples` verdicts each."""
    rates = rng.beta(2.0, 3.0, size=problems)
    return Verdicts.from_lists([list(rng.random(samples) < p) for p in rates])


def test_intervals_cover_the_true_rate():
    """200 seeded benchmarks of 30 problems x 5 samples: the 95% interval covers the population rate 0.4 in at
    least 90% of them, and is not much wider than the textbook width (so covering is not trivial)."""
    true_rate = 0.4
    # per-problem mean accuracy: Var = Var(p) + E[p(1 - p)] / 5 = 0.04 + 0.2 / 5 for Beta(2, 3)
    textbook_width = 2 * 1.96 * math.sqrt((0.04 + 0.2 / 5) / 30)
    rng = np.random.default_rng(1234)
    config = BootstrapConfig()
    covered, widths = 0, []
    for simulation in range(200):
        verdicts = simulated_verdicts(rng)
        lo, hi = pass1_intervals({"sim": verdicts}, BootstrapConfig(seed=simulation))[0]["sim"]
        covered += lo <= true_rate <= hi
        widths.append(hi - lo)
        assert lo <= verdicts.pass1 <= hi
    assert covered / 200 >= 0.90
    assert np.mean(widths) < 1.5 * textbook_width
    assert config.resamples == 2000 and config.seed == 0


def test_seeded_bootstrap_is_deterministic_and_per_dataset():
    rng = np.random.default_rng(7)
    a, b = simulated_verdicts(rng), simulated_verdicts(rng, problems=40)
    config = BootstrapConfig()
    first = pass1_intervals({"a": a, "b": b}, config)
    again = pass1_intervals({"b": b, "a": a}, config)
    assert first == again
    alone, _ = pass1_intervals({"a": a}, config)
    assert alone["a"] == first[0]["a"]  # a dataset's interval does not depend on the others
    other_seed, _ = pass1_intervals({"a": a}, BootstrapConfig(seed=1))
    assert other_seed["a"] != alone["a"]
    lo, hi = first[1]
    assert lo < (a.pass1 + b.pass1) / 2 < hi
    # the mean over datasets is tighter than either dataset alone
    assert hi - lo < min(top - bottom for bottom, top in first[0].values())


def test_degenerate_verdicts():
    config = BootstrapConfig()
    all_right = Verdicts.from_lists([[True] * 5] * 10)
    assert pass1_intervals({"x": all_right}, config)[0]["x"] == (1.0, 1.0)
    one = Verdicts.from_lists([[True, False]])  # one problem: only the sample noise is left
    replicates = bootstrap_pass1(one, 2000, generator(0, "x"))
    assert set(np.unique(replicates)) == {0.0, 0.5, 1.0}
    assert interval(replicates, 0.95) == (0.0, 1.0)
    with pytest.raises(DynTSError):
        Verdicts.from_lists([])
    with pytest.raises(DynTSError):
        Verdicts.from_lists([[True], []])


@pytest.mark.parametrize(
    "bad", [dict(resamples=10), dict(seed=-1), dict(confidence=1.0), dict(confidence=0.2), dict(permutations=5)]
)
def test_bootstrap_config_refuses_bad_settings(bad):
    with pytest.raises(DynTSError):
        BootstrapConfig(**bad)


def two_runs(differing: int, problems: int = 30, samples: int = 5):
    """Run A is right on the first half of the problems; run B also on `differing` more of them."""
    a = [[i < problems // 2] * samples for i in range(problems)]
    b = [[i < problems // 2 + differing] * samples for i in range(problems)]
    return Verdicts.from_lists(a), Verdicts.from_lists(b)


def test_paired_test_on_runs_that_differ_by_one_problem():
    a, b = two_runs(differing=1)
    d = b.accuracy - a.accuracy
    assert d.sum() == 1
    # one differing problem: every swap pattern gives the same |statistic|, so nothing is evidence of a difference
    assert paired_permutation_pvalue([d], 10000, generator(0, "x", 2)) == 1.0
    replicates = paired_bootstrap(a, b, 2000, generator(0, "x", 1))
    lo, hi = interval(replicates, 0.95)
    assert lo <= 0.0 < 1 / 30 <= hi


def test_paired_test_finds_a_real_difference():
    a, b = two_runs(differing=10)
    d = b.accuracy - a.accuracy
    # exact: 10 problems all one way: 2 of the 2**10 sign patterns are as extreme
    assert paired_permutation_pvalue([d], 10000, generator(0, "x", 2)) == pytest.approx(2 / 2**10)
    lo, hi = interval(paired_bootstrap(a, b, 2000, generator(0, "x", 1)), 0.95)
    assert 0 < lo < 10 / 30 < hi
    # more differing problems than are enumerated: seeded random swaps, p at its floor 1 / (1 + permutations)
    a, b = two_runs(differing=20, problems=60)
    d = b.accuracy - a.accuracy
    p = paired_permutation_pvalue([d], 2000, generator(0, "x", 2))
    assert p == pytest.approx(1 / 2001)
    assert p == paired_permutation_pvalue([d], 2000, generator(0, "x", 2))


def test_permutation_p_is_uniform_ish_under_no_difference():
    """Two runs drawn from the same rates: p < 0.05 in about 5% of 200 seeded trials (not 0%, not 30%)."""
    rng = np.random.default_rng(99)
    small = 0
    for trial in range(200):
        rates = rng.beta(2.0, 3.0, size=30)
        a = Verdicts.from_lists([list(rng.random(5) < p) for p in rates])
        b = Verdicts.from_lists([list(rng.random(5) < p) for p in rates])
        small += paired_permutation_pvalue([b.accuracy - a.accuracy], 2000, generator(trial, "x", 2)) < 0.05
    assert 0 < small / 200 <= 0.10


def test_paired_inputs_must_line_up():
    a, _ = two_runs(differing=1)
    with pytest.raises(DynTSError):
        paired_bootstrap(a, Verdicts.from_lists([[True]]), 100, generator(0, "x"))
    with pytest.raises(DynTSError):
        paired_permutation_pvalue([np.array([])], 100, generator(0, "x"))
