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
