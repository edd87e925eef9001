"""How well scores rank a trace's thinking tokens against their labels: Spearman, Kendall tau-b and top-k recall
per trace, averaged over traces, for the head, recency and the attention reference (train.py's docstring:
Metrics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dynts.errors import DynTSError
from dynts.models.importance_head import ImportanceHead
from dynts.predictor.labels import LabelSet
from dynts.predictor.objective import HEAVY_RANGE, HEAVY_WEIGHT, parse_transform, weighted_mse


def ranking_metrics(pred, true, retention: float) -> dict:
    """Spearman, Kendall tau-b and top-k recall (k = max(1, floor(retention * n))) of one trace's scores.

    A correlation is None where it is undefined (fewer than 2 tokens, or constant scores/labels).
    """
    import numpy as np
    from scipy import stats

    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    n = pred.size
    if n == 0:
        raise DynTSError("ranking metrics need at least one token")
    k = max(1, int(math.floor(retention * n + 1e-9)))
    top_pred = np.argsort(-pred, kind="stable")[:k]
    top_true = np.argsort(-true, kind="stable")[:k]
    recall = len(np.intersect1d(top_pred, top_true)) / k

    def corr(fn):
        if n < 2 or np.ptp(pred) == 0 or np.ptp(true) == 0:
            return None
        value = fn(pred, true)[0]
        return None if not np.isfinite(value) else float(value)

    return {
        "spearman": corr(stats.spearmanr),
        "kendall": corr(lambda a, b: stats.kendalltau(a, b, variant="b")),
        "topk_recall": float(recall),
    }


RANKING = ("spearman", "kendall", "topk_recall")


def _average(per_trace: list[dict]) -> dict:
    out = {}
    for name in RANKING:
        values = [m[name] for m in per_trace if m[name] is not None]
        out[name] = float(sum(values) / len(values)) if values else None
    return out


@torch.no_grad()
def predict(head: ImportanceHead, features: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Head scores (float32, CPU) for rows of features, computed in chunks on the head's device."""
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    out = [
        head(features[i : i + chunk].to(device, torch.float32)).float().cpu()
        for i in range(0, features.shape[0], chunk)
    ]
    head.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_head(
    head: ImportanceHead,
    label_set: LabelSet,
    traces: Sequence[int],
    retention: float,
    transform: str | None = None,
    band: tuple[float, float] = HEAVY_RANGE,
    weight: float = HEAVY_WEIGHT,
) -> dict:
    """Held-out figures of a head on `traces` (see the module docstring).

    Returns spearman, kendall, topk_recall (per trace, averaged over traces), loss (weighted MSE on transformed
    labels over all tokens of `traces`; transform defaults to the head's label_transform), traces and tokens.
    """
    fn = parse_transform(transform or head.config.label_transform)
    traces = [t for t in traces if label_set.supervised_count(t) > 0]
    if not traces:
        raise DynTSError("evaluate_head needs at least one trace with supervised tokens")
    rows = label_set.rows(traces)
    scores = predict(head, label_set.features[rows])
    labels = label_set.labels[rows]
    per_trace, start = [], 0
    for t in traces:
        n = label_set.supervised_count(t)
        per_trace.append(ranking_metrics(scores[start : start + n], labels[start : start + n], retention))
        start += n
    out = _average(per_trace)
    targets = fn(labels, [label_set.supervised_count(t) for t in traces])
    out["loss"] = float(weighted_mse(scores, targets, band, weight))
    out["traces"], out["tokens"] = len(traces), int(rows.numel())
    return out


def evaluate_scores(label_set: LabelSet, traces: Sequence[int], retention: float, scores: torch.Tensor) -> dict:
    """Ranking figures of per-row `scores` (aligned with the label set's rows) against the labels."""
    per_trace = []
    for t in traces:
        if label_set.supervised_count(t) == 0:
            continue
        rows = label_set.trace_rows(t)
        per_trace.append(ranking_metrics(scores[rows].float(), label_set.labels[rows], retention))
    return _average(per_trace)


def evaluate_recency(label_set: LabelSet, traces: Sequence[int], retention: float) -> dict:
    """The length-only baseline: score = position in the trace (newer = more important)."""
    return evaluate_scores(label_set, traces, retention, label_set.positions)


def evaluate_reference(label_set: LabelSet, traces: Sequence[int], retention: float) -> dict | None:
    """The attention baseline: score = attention received from later thinking queries by the end of thinking
    (labels.py, AnswerAttention); None when the shards were labelled without it."""
    if label_set.reference is None:
        return None
    return evaluate_scores(label_set, traces, retention, label_set.reference)
