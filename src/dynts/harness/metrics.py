"""Accuracy and efficiency metrics over stored samples.

Definitions (paper protocol):

* pass@1 = avg@k: mean correctness over a problem's samples, averaged over problems.
* pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (n samples,
  c correct), averaged over problems.
* maj@k: majority vote over the extracted answers of the first k samples.
  Answers are grouped by a light textual normal form (spacing, ``$``,
  ``\\dfrac``). ``None`` never wins. Ties go to the answer whose first
  occurrence is the earliest sample, so the result never depends on set or
  dict ordering. The vote is correct when that sample was graded correct.
* k is the smallest number of samples any problem of the dataset has, so a
  partially finished run still gets well-defined numbers (``complete`` says
  whether every problem has the same count).
* tps = sum(generated_tokens) / sum(time_share_s): decode wall time including
  scoring and eviction; tps_forward uses forward_share_s (forward pass only).
  Both sums run over the samples that have both numbers.
* pass@1_ci: the 95% interval of pass@1, a seeded bootstrap over problems and, within each, over its samples
  (uncertainty.py; the settings are recorded under "bootstrap"). The mean's interval resamples every dataset
  and averages, replicate by replicate.
* mean / median / p90 generated tokens and the truncation rate (share of samples stopped by max_new_tokens):
  lengths.py.

The "mean" block is the unweighted mean over datasets (peaks: the max; counts: the sum).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from dynts.errors import DynTSError
from dynts.harness.lengths import LENGTH_KEYS, length_stats
from dynts.harness.records import figure
from dynts.harness.uncertainty import BootstrapConfig, Verdicts, pass1_intervals

RATE_KEYS = ("pass@1", "pass@k", "maj@k", "tps", "tps_forward", "latency_s", *LENGTH_KEYS)
PEAK_KEYS = ("peak_kv_tokens", "peak_kv_bytes")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DynTSError(f"pass@k: {name} must be an integer, got {value!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise DynTSError(f"pass@k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials.
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def avg_at_k(correct: Sequence[bool], k: int | None = None) -> float:
    """Mean correctness of the first k samples (all of them when k is None)."""
    chosen = _first_k(correct, k)
    return sum(bool(x) for x in chosen) / len(chosen)


def majority_index(answers: Sequence[str | None], k: int | None = None) -> int | None:
    """Index of the sample whose answer wins the vote among the first k, or None if none answered."""
    chosen = _first_k(answers, k)
    counts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for index, answer in enumerate(chosen):
        if answer is None:
            continue
        key = _vote_key(answer)
        if not key:
            continue
        counts[key] = counts.get(key, 0) + 1
        first_seen.setdefault(key, index)
    if not counts:
        return None
    winner = max(counts, key=lambda key: (counts[key], -first_seen[key]))
    return first_seen[winner]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int | None = None) -> float:
    """1.0 when the majority answer among the first k samples is correct, else 0.0."""
    if len(answers) != len(correct):
        raise DynTSError("maj@k: answers and correctness lists differ in length")
    winner = majority_index(answers, k)
    return float(winner is not None and bool(correct[winner]))


def summarize(records: Iterable[dict], bootstrap: BootstrapConfig | None = None) -> dict:
    """Per-dataset metrics and their mean over datasets, from stored sample records.

    bootstrap: the settings of the pass@1 intervals (default: BootstrapConfig(), a fixed seed)."""
    bootstrap = bootstrap or BootstrapConfig()
    by_dataset = group_records(records)
    datasets = {name: _dataset_metrics(problems) for name, problems in sorted(by_dataset.items())}
    mean = _mean_over(list(datasets.values()))
    verdicts = {name: Verdicts.from_lists(correctness(problems)) for name, problems in by_dataset.items()}
    per_dataset, mean_ci = pass1_intervals(verdicts, bootstrap)
    datasets = {name: _with_interval(row, list(per_dataset[name])) for name, row in datasets.items()}
    mean = _with_interval(mean, list(mean_ci) if mean_ci is not None else None)
    return {"datasets": datasets, "mean": mean, "bootstrap": bootstrap.to_dict()}


def group_records(records: Iterable[dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """dataset -> problem id -> sample index -> record; the first copy of a duplicated key wins."""
    by_dataset: dict[str, dict[str, dict[int, dict]]] = {}
    for record in records:
        problems = by_dataset.setdefault(str(record["dataset"]), {})
        samples = problems.setdefault(str(record["id"]), {})
        samples.setdefault(int(record["sample"]), record)
    return by_dataset


def correctness(problems: dict[str, dict[int, dict]]) -> list[list[bool]]:
    """Per problem (in id order of first appearance), its samples' verdicts in sample order."""
    return [[bool(samples[i].get("correct")) for i in sorted(samples)] for samples in problems.values()]


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _with_interval(row: dict, ci: list[float] | None) -> dict:
    """The row with "pass@1_ci" placed right after "pass@1"."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        out[key] = value
        if key == "pass@1":
            out["pass@1_ci"] = ci
    return out


def _first_k(items: Sequence, k: int | None) -> Sequence:
    if not items:
        raise DynTSError("no samples to score")
    if k is None:
        return items
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(items):
        raise DynTSError(f"k must be between 1 and the number of samples ({len(items)}), got {k!r}")
    return items[:k]


def _vote_key(answer: str) -> str:
    key = "".join(str(answer).split()).strip("$")
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", "")):
        key = key.replace(old, new)
    return key


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _stat(record: dict, key: str) -> float | None:
    return _number(figure(record, key))


def _ratio(records: list[dict], denominator_key: str) -> float | None:
    tokens = seconds = 0.0
    for record in records:
        generated, time_s = _stat(record, "generated_tokens"), _stat(record, denominator_key)
        if generated is not None and time_s is not None:
            tokens += generated
            seconds += time_s
    return tokens / seconds if seconds > 0 else None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _dataset_metrics(problems: dict[str, dict[int, dict]]) -> dict:
    counts = [len(samples) for samples in problems.values()]
    k = min(counts)
    pass1, passk, majk = [], [], []
    all_records: list[dict] = []
    for samples in problems.values():
        ordered = [samples[index] for index in sorted(samples)]
        all_records.extend(ordered)
        correct = [bool(r.get("correct")) for r in ordered]
        pass1.append(avg_at_k(correct))
        passk.append(pass_at_k(len(correct), sum(correct), k))
        majk.append(maj_at_k([r.get("extracted") for r in ordered], correct, k))
    peak_tokens = _max(_stat(r, "peak_kv_tokens") for r in all_records)
    peak_bytes = _max(_stat(r, "peak_kv_bytes") for r in all_records)
    return {
        "n_problems": len(problems),
        "n_samples": len(all_records),
        "samples_per_problem": k,
        "complete": min(counts) == max(counts),
        "k": k,
        "pass@1": sum(pass1) / len(pass1),
        "pass@k": sum(passk) / len(passk),
        "maj@k": sum(majk) / len(majk),
        "tps": _ratio(all_records, "time_share_s"),
        "tps_forward": _ratio(all_records, "forward_share_s"),
        "latency_s": _mean(_stat(r, "latency_s") for r in all_records),
        "peak_kv_tokens": int(peak_tokens) if peak_tokens is not None else None,
        "peak_kv_bytes": int(peak_bytes) if peak_bytes is not None else None,
        **length_stats(all_records),
    }


def _mean_over(rows: list[dict]) -> dict:
    mean: dict[str, Any] = {
        "n_datasets": len(rows),
        "n_problems": sum(r["n_problems"] for r in rows),
        "n_samples": sum(r["n_samples"] for r in rows),
        "samples_per_problem": min((r["samples_per_problem"] for r in rows), default=None),
        "complete": all(r["complete"] for r in rows),
        "k": min((r["k"] for r in rows), default=None),
    }
    for key in RATE_KEYS:
        mean[key] = _mean(r[key] for r in rows)
    for key in PEAK_KEYS:
        mean[key] = _max(r[key] for r in rows)
    return mean
