"""pass@k against brute force, majority-vote ties, and summarize on synthetic records."""

import itertools
import math

import pytest

from dynts.errors import DynTSError
from dynts.harness.metrics import avg_at_k, maj_at_k, majority_index, pass_at_k, summarize


def brute_force_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    value = pass_at_k(1000, 3, 50)
    exact = 1 - math.comb(997, 50) / math.comb(1000, 50)
    assert value == pytest.approx(exact, rel=1e-9)
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(DynTSError):
        pass_at_k(n, c, k)


def test_avg_at_k():
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([True, False, True, True], k=2) == 0.5
    with pytest.raises(DynTSError):
        avg_at_k([True], k=2)


def test_majority_vote_and_ties():
    # clear majority
    assert maj_at_k(["3", "4", "4"], [False, True, True]) == 1.0
    # 2-2 tie: the answer seen first (sample 0) wins
    assert majority_index(["7", "8", "8", "7"]) == 0
    assert maj_at_k(["7", "8", "8", "7"], [False, True, True, False]) == 0.0
    assert majority_index(["8", "7", "7", "8"]) == 0
    # None never wins, even when it is the most frequent
    assert majority_index([None, None, None, "5"]) == 3
    assert maj_at_k([None, None, None], [False, False, False]) == 0.0
    # spacing, $ and \dfrac do not split votes
    assert majority_index([r"\frac{1}{2}", "2", r"\dfrac{1}{2}", " 2 ", r"$\frac{1}{2}$"]) == 0
    # only the first k samples vote
    assert majority_index(["1", "2", "2", "2"], k=1) == 0


def record(dataset, pid, sample, correct, extracted, **stats):
    return {
        "dataset": dataset,
        "id": pid,
        "sample": sample,
        "correct": correct,
        "extracted": extracted,
        "response": "",
        "gold": "",
        "kind": "math",
        "prompt_tokens": 10,
        "generated_tokens": stats.get("generated_tokens"),
        "stats": stats,
    }


def test_summarize_synthetic_records():
    stats = dict(
        generated_tokens=100,
        time_share_s=2.0,
        forward_share_s=1.0,
        latency_s=3.0,
        peak_kv_tokens=500,
        peak_kv_bytes=4000,
    )
    records = [
        # dataset a: p1 2/2 correct, p2 0/2 correct (majority "9" wrong)
        record("a", "p1", 0, True, "1", **stats),
        record("a", "p1", 1, True, "1", **stats),
        record("a", "p2", 0, False, "9", **stats),
        record("a", "p2", 1, False, "9", **{**stats, "peak_kv_tokens": 800, "peak_kv_bytes": 9000}),
        # dataset b: one problem, 1 of 2 correct; stats partly missing
        record("b", "q1", 1, True, "5", generated_tokens=50, time_share_s=1.0),
        record("b", "q1", 0, False, "6", generated_tokens=30),
    ]
    result = summarize(records)
    a, b, mean = result["datasets"]["a"], result["datasets"]["b"], result["mean"]
    assert a["n_problems"] == 2 and a["samples_per_problem"] == 2 and a["complete"]
    assert a["pass@1"] == pytest.approx(0.5)
    assert a["pass@k"] == pytest.approx(0.5)
    assert a["maj@k"] == pytest.approx(0.5)
    assert a["tps"] == pytest.approx(400 / 8.0)
    assert a["tps_forward"] == pytest.approx(400 / 4.0)
    assert a["latency_s"] == pytest.approx(3.0)
    assert a["peak_kv_tokens"] == 800 and a["peak_kv_bytes"] == 9000
    assert a["mean_generated_tokens"] == pytest.approx(100)

    assert b["pass@1"] == pytest.approx(0.5)
    assert b["pass@k"] == pytest.approx(1.0)
    assert b["maj@k"] == 0.0  # 1-1 tie: sample 0 ("6", wrong) wins
    assert b["tps"] == pytest.approx(50.0)  # only the sample with both numbers counts
    assert b["tps_forward"] is None and b["latency_s"] is None and b["peak_kv_tokens"] is None
    assert b["mean_generated_tokens"] == pytest.approx(40)

    assert mean["n_problems"] == 3 and mean["n_datasets"] == 2
    assert mean["pass@1"] == pytest.approx(0.5)
    assert mean["pass@k"] == pytest.approx(0.75)
    assert mean["tps"] == pytest.approx((50.0 + 50.0) / 2)
    assert mean["tps_forward"] == pytest.approx(100.0)
    assert mean["peak_kv_tokens"] == 800


def test_summarize_partial_run_uses_smallest_sample_count():
    records = [
        record("a", "p1", 0, False, "1"),
        record("a", "p1", 1, True, "2"),
        record("a", "p1", 2, True, "2"),
        record("a", "p2", 0, True, "3"),
        record("a", "p2", 0, False, "3"),  # duplicate key: the first copy wins
    ]
    a = summarize(records)["datasets"]["a"]
    assert a["k"] == 1 and not a["complete"] and a["n_samples"] == 4
    assert a["pass@1"] == pytest.approx((2 / 3 + 1) / 2)
    assert a["pass@k"] == pytest.approx((2 / 3 + 1) / 2)
    assert a["maj@k"] == pytest.approx(0.5)  # p1's first sample alone votes, wrong


def test_summarize_empty():
    result = summarize([])
    assert result["datasets"] == {} and result["mean"]["n_problems"] == 0
    assert result["mean"]["pass@1"] is None


def test_summarize_intervals_lengths_and_truncation():
    records = []
    for i in range(12):
        for s in range(3):
            length = 100 * (i + 1) + s
            reason = "length" if i >= 9 else "eos"  # the 3 longest problems hit max_new_tokens
            records.append(
                record("a", f"p{i}", s, (i + s) % 3 == 0, "1", generated_tokens=length, finish_reason=reason)
            )
    records.append(record("b", "q0", 0, True, "1", generated_tokens=50))  # no finish reason recorded
    result = summarize(records)
    a, b, mean = result["datasets"]["a"], result["datasets"]["b"], result["mean"]
    assert list(a)[list(a).index("pass@1") + 1] == "pass@1_ci"
    lo, hi = a["pass@1_ci"]
    assert lo < a["pass@1"] < hi and 0 <= lo and hi <= 1
    assert b["pass@1_ci"] == [1.0, 1.0]
    mlo, mhi = mean["pass@1_ci"]
    assert mlo < mean["pass@1"] < mhi
    assert result["bootstrap"]["seed"] == 0 and result["bootstrap"]["resamples"] == 2000
    assert summarize(records) == result  # seeded: the same records give the same intervals

    lengths = sorted(100 * (i + 1) + s for i in range(12) for s in range(3))
    assert a["mean_generated_tokens"] == pytest.approx(sum(lengths) / 36)
    assert a["median_generated_tokens"] == pytest.approx((lengths[17] + lengths[18]) / 2)
    position = 0.9 * 35  # numpy's linear interpolation between order statistics
    low = lengths[int(position)]
    assert a["p90_generated_tokens"] == pytest.approx(low + (position % 1) * (lengths[int(position) + 1] - low))
    assert a["truncation_rate"] == pytest.approx(9 / 36)
    assert b["truncation_rate"] is None and b["median_generated_tokens"] == 50
    assert mean["truncation_rate"] == pytest.approx(9 / 36)  # the mean over the datasets that recorded one


def test_table_names_k_and_never_repeats_a_header():
    from dynts.harness.report import format_table

    one_sample = summarize([record("a", f"p{i}", 0, i % 2 == 0, "1") for i in range(4)])
    header = format_table(one_sample).splitlines()[0].split("  ")
    names = [h.strip() for h in header if h.strip()]
    assert len(names) == len(set(names))
    assert "pass@1 [95% CI]" in names and "maj@1" in names and "pass@k" not in names
    five = summarize([record("a", f"p{i}", s, s < 2, "1") for i in range(4) for s in range(5)])
    table = format_table(five)
    assert "pass@5" in table and "maj@5" in table and "@k" not in table
    lo, hi = five["datasets"]["a"]["pass@1_ci"]
    assert f"40.0 [{100 * lo:.1f}, {100 * hi:.1f}]" in table
    mixed = summarize(
        [record("a", "p0", s, True, "1") for s in range(2)] + [record("b", "q0", s, True, "1") for s in range(3)]
    )
    table = format_table(mixed, markdown=True)
    assert "| pass@k |" in table and "(k=2)" in table and "(k=3)" in table and "(k mixed)" in table
