"""A sample's record: the one grading rule and the one reading of the engine's figures.

`dynts eval` and `dynts regrade` both grade through `grade`, so a stored answer and a re-graded one can never
disagree by construction. A record stores each figure once: the engine's per-sample figures (prompt and
generated tokens, why it stopped, timings) live in its `stats`; `figure` reads them there, and from the
record's top level for run directories written before that (they stored the token counts and the finish reason
twice).
"""

from __future__ import annotations

from typing import Any

from dynts.errors import DynTSError
from dynts.harness.datasets import dataset_kind
from dynts.harness.grading import DEFAULT_TIMEOUT_S, extract_answer, grade_answer
from dynts.harness.prompts import gold_for_grading

# Figures older records also hold at their top level (read by `figure` when stats lacks them).
LEGACY_TOP_LEVEL = ("prompt_tokens", "generated_tokens", "finish_reason")


def grade(response: str, gold: str, kind: str, timeout: float | None = None) -> dict:
    """{"extracted", "correct"} of a response against its gold: the grading of every record."""
    extracted = extract_answer(response, kind)
    return {
        "extracted": extracted,
        "correct": grade_answer(extracted, gold, kind, timeout=timeout or DEFAULT_TIMEOUT_S),
    }


def build_record(
    problem: Any,
    sample: int,
    response: str,
    stats: dict | None = None,
    shuffle_seed: int = 42,
    timeout: float | None = None,
) -> dict:
    """Grade one generated response and shape it as a store record."""
    gold = gold_for_grading(problem, shuffle_seed)
    return {
        "dataset": problem.dataset,
        "id": problem.id,
        "sample": sample,
        "kind": problem.kind,
        "gold": gold,
        **grade(response, gold, problem.kind, timeout),
        "response": response,
        "stats": dict(stats or {}),
    }


def regraded(record: dict, timeout: float | None = None) -> dict:
    """The record graded again with the current grader (its kind from the dataset when an old record lacks it)."""
    kind = record.get("kind") or _kind_of(record["dataset"])
    return {**record, "kind": kind, **grade(str(record.get("response", "")), str(record["gold"]), kind, timeout)}


def figure(record: dict, key: str) -> Any:
    """One of the engine's figures of a sample: record.stats[key], else (an older record) record[key]."""
    stats = record.get("stats")
    value = stats.get(key) if isinstance(stats, dict) else None
    if value is None and key in LEGACY_TOP_LEVEL:
        value = record.get(key)
    return value


def _kind_of(dataset: str) -> str:
    try:
        return dataset_kind(dataset)
    except DynTSError:
        return "math"


__all__ = ["LEGACY_TOP_LEVEL", "build_record", "figure", "grade", "regraded"]
