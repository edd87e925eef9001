"""`dynts train`: fit the importance head on the label shards written by `dynts label` (docs/algorithm.md).

Data. `dynts label DIR` writes DIR/labels/index.json and safetensors shards holding, per token of every kept
trace, the raw label (mean attention the answer queries pay to it) and the frozen model's last hidden state
(after the final norm). Only thinking tokens [think_start, think_end) are supervised; `load_label_set` keeps
just those rows.

Memory. The features are cached in the shards as float16, 2 bytes x hidden_size per token (a 1.5B model with
hidden size 1536: 3 KiB per token, 3 GiB per million tokens on disk). That trades disk for never running the
LLM again: every epoch reads the cached features, and the LLM stays frozen by construction. `load_label_set`
holds the supervised rows of all shards in memory at the same 2 bytes x hidden per token; training moves the
training rows to the training device once and casts each minibatch to float32.

Fit. Labels are transformed (`scale:S` -> S*x; `pow:P` -> 10*x^P/P), the loss is a weighted MSE (weight 5 where
the transformed label lies in the heavy band, else 1), AdamW with linear warm-up over the first `warmup` fraction
of steps and cosine decay to 0, gradients clipped to norm `clip_norm` (1.0), `epochs` passes over shuffled token
minibatches of `batch_tokens` tokens. The heavy band is by default the transformed training labels between their
0.75 and 0.9 quantiles (`quantile:0.75:0.9`): a band of label *values* such as the paper's [4, 5) depends on trace
length (a label is a mean attention, about 1/L for a typical token), so [4, 5) sized for 10k-token traces lands on
typical tokens of 300-token ones; a quantile band weights the same share of tokens at any length. The band sits
just above the typical token, where a top-k selection decides (on our 380-token GSM8K solution traces [4, 5) of
pow:0.3 lies at the 0.81-0.92 quantiles); weighting the extreme top (`quantile:0.9`) fitted worse on held-out
rankings (docs/algorithm.md). `value:4:5` keeps the paper's band.

Split. Traces are split into training and held-out traces by `seed`; all samples of one problem (same dataset
and id in the shard keys) land on the same side, so a held-out problem was never seen in training.

Metrics (on the held-out traces). For each trace, over its thinking tokens: Spearman rank correlation and
Kendall tau-b between predicted score and raw label, and top-k recall with k = max(1, floor(retention * n)):
|top-k by prediction ∩ top-k by label| / k (ties broken towards the earlier token); each is then averaged
over traces (traces where a correlation is undefined, e.g. a constant label, are left out of that average).
`heldout_loss` is the weighted MSE on transformed labels over all held-out tokens; `heldout_loss_initial` is
the same for the freshly initialised head. `random_init` holds the three ranking figures of the untrained
head, `baseline_recency` those of scoring by position (newer = more important), which is what a window
policy keeps, and `baseline_attention` those of the attention reference stored by `dynts label` (the attention
each thinking token has received from the later thinking queries by the time the answer starts: what H2O would
rank by if it selected then, with nothing evicted before). A head is useful where it beats recency; beating the
attention reference means it predicts the answer's needs better than accumulated attention does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dynts.config import DEFAULT_BAND
from dynts.errors import DynTSError
from dynts.models.importance_head import HeadConfig, ImportanceHead

INDEX_FILE = "index.json"
LABELS_DIR = "labels"
HEAVY_WEIGHT = 5.0
HEAVY_RANGE = (4.0, 5.0)  # the paper's band of transformed label values, sized for 10k-token R1 traces


# ----------------------------------------------------------------------------------------------- transforms


def parse_transform(spec: str) -> Callable:
    """The label transform named by `spec`: "scale:S" -> y = S*x, "pow:P" -> y = 10*x^P/P.

    The returned function works on floats and on tensors.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise DynTSError(f"label transform must be 'scale:S' or 'pow:P' (e.g. scale:10000, pow:0.3), got {spec!r}")
    kind, _, value = spec.partition(":")
    kind = kind.strip().lower()
    try:
        number = float(value)
    except ValueError:
        raise DynTSError(f"label transform {spec!r}: {value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise DynTSError(f"label transform {spec!r}: the parameter must be a positive finite number")
    if kind == "scale":
        return lambda x: x * number
    if kind == "pow":
        return lambda x: 10.0 * x**number / number
    raise DynTSError(f"unknown label transform {kind!r} in {spec!r}: use 'scale:S' or 'pow:P'")


def parse_band(spec: str) -> tuple[str, float, float]:
    """The heavy-weight band named by `spec`: ("quantile", LO, HI) or ("value", LO, HI).

    quantile:LO[:HI]  the transformed training labels between their LO and HI quantiles (HI defaults to 1: the
                      top 1 - LO of the labels), whatever the trace lengths and transform;
    value:LO:HI       transformed labels in [LO, HI) (value:4:5 is the paper's band);
    none              no heavy weight (plain MSE).
    """
    text = str(spec).strip().lower() if spec is not None else ""
    if text == "none":
        return ("value", math.inf, math.inf)
    kind, _, rest = text.partition(":")
    try:
        numbers = [float(x) for x in rest.split(":")] if rest else []
    except ValueError:
        numbers = []
    if kind == "quantile" and len(numbers) == 1:
        numbers.append(1.0)
    ok = len(numbers) == 2 and all(math.isfinite(x) for x in numbers) and numbers[0] < numbers[1]
    if kind == "quantile" and ok and 0.0 <= numbers[0] and numbers[1] <= 1.0:
        return ("quantile", numbers[0], numbers[1])
    if kind == "value" and ok:
        return ("value", numbers[0], numbers[1])
    raise DynTSError(
        f"loss band must be quantile:LO[:HI] (0 <= LO < HI <= 1), value:LO:HI (LO < HI) or none, got {spec!r}"
    )


def band_limits(spec: str, targets: torch.Tensor) -> tuple[float, float]:
    """[low, high) in transformed-label values: a value band as given, a quantile band from `targets`."""
    kind, low, high = parse_band(spec)
    if kind == "value":
        return low, high
    ordered = targets.detach().flatten().double().sort().values
    if ordered.numel() == 0:
        raise DynTSError("a quantile loss band needs training labels")
    at = lambda q: float(ordered[min(ordered.numel() - 1, int(math.floor(q * ordered.numel())))])
    return at(low), (math.inf if high >= 1.0 else at(high))


def loss_weights(target: torch.Tensor, band: tuple[float, float] = HEAVY_RANGE, weight: float = HEAVY_WEIGHT):
    """`weight` where the transformed label lies in [band[0], band[1]), else 1."""
    low, high = band
    heavy = (target >= low) & (target < high)
    return torch.where(heavy, torch.full_like(target, weight), torch.ones_like(target))


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, band: tuple[float, float] = HEAVY_RANGE, weight: float = HEAVY_WEIGHT
) -> torch.Tensor:
    """mean(w * (pred - target)^2) with w from `loss_weights` (on the transformed labels)."""
    return (loss_weights(target, band, weight) * (pred - target) ** 2).mean()


def train_step(head, optimizer, features, targets, band, weight: float = HEAVY_WEIGHT, clip_norm=None):
    """One optimizer step on a minibatch; returns (loss, gradient norm before clipping).

    clip_norm: rescale the gradients to this total norm when they exceed it (None: no clipping)."""
    loss = weighted_mse(head(features.float()), targets, band, weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in head.parameters() if p.grad is not None]
    if clip_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    optimizer.step()
    return float(loss.detach()), float(norm)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Training settings; defaults are the paper's (docs/algorithm.md) except batch_tokens, which the paper leaves open.

    hidden: widths of the head's hidden layers (a small model wants a much smaller head than (8192, 2048)).
    warmup: fraction of the optimizer steps spent in linear warm-up.
    batch_tokens: supervised tokens per optimizer step.
    band: which transformed labels get the heavy loss weight (parse_band); weight: that weight.
    clip_norm: gradients are rescaled to this total norm when larger (the method's recipe: 1.0); None: off.
    heldout: fraction of the traces (at least one problem) held out for the metrics.
    retention: the r of the top-k recall metric, k = floor(r * thinking tokens).
    device: where to train; None picks CUDA when available, else CPU.
    """

    hidden: tuple[int, ...] = (8192, 2048)
    epochs: int = 15
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: float = 0.1
    batch_tokens: int = 4096
    transform: str = "scale:10000"
    band: str = DEFAULT_BAND
    weight: float = HEAVY_WEIGHT
    clip_norm: float | None = 1.0
    heldout: float = 0.1
    seed: int = 0
    retention: float = 0.4
    device: str | None = None

    def __post_init__(self):
        try:
            self.hidden = tuple(int(x) for x in self.hidden)
            self.betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise DynTSError(
                f"hidden must be a list of layer widths and betas a pair of numbers, "
                f"got hidden={self.hidden!r} betas={self.betas!r}"
            ) from None
        if not self.hidden or any(x <= 0 for x in self.hidden):
            raise DynTSError(f"head hidden layer widths must be positive integers, got {self.hidden}")
        if not _is_int(self.epochs) or self.epochs < 1:
            raise DynTSError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not _finite(self.lr) or self.lr <= 0:
            raise DynTSError(f"learning rate must be a positive number, got {self.lr!r}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise DynTSError(f"weight decay must be a non-negative number, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise DynTSError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not _finite(self.warmup) or not 0.0 <= self.warmup < 1.0:
            raise DynTSError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if not _is_int(self.batch_tokens) or self.batch_tokens < 1:
            raise DynTSError(f"batch_tokens must be a positive integer, got {self.batch_tokens!r}")
        parse_transform(self.transform)
        parse_band(self.band)
        if not _finite(self.weight) or self.weight < 1.0:
            raise DynTSError(f"the heavy loss weight must be a number >= 1, got {self.weight!r}")
        if self.clip_norm is not None and (not _finite(self.clip_norm) or self.clip_norm <= 0):
            raise DynTSError(f"gradient clipping norm must be a positive number (or None: off), got {self.clip_norm!r}")
        if not _finite(self.heldout) or not 0.0 < self.heldout < 1.0:
            raise DynTSError(f"heldout is a fraction of the traces in (0, 1), got {self.heldout!r}")
        if not _is_int(self.seed):
            raise DynTSError(f"seed must be an integer, got {self.seed!r}")
        if not _finite(self.retention) or not 0.0 < self.retention <= 1.0:
            raise DynTSError(f"retention must be in (0, 1], got {self.retention!r}")

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise DynTSError(f"unknown training device {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DynTSError(f"training device {self.device!r} requested but CUDA is not available")
        return device


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------- label set


@dataclass
class LabelSet:
    """The supervised (thinking) tokens of every trace in a label directory.

    Rows of `features` / `labels` / `positions` are grouped by trace: trace i owns rows
    [offsets[i], offsets[i+1]). `positions` are token positions within the trace (prompt included).
    """

    directory: Path
    model: str
    hidden_size: int
    answer_rule: str
    keys: list[tuple]
    spans: torch.Tensor  # int64 [N, 4]
    lengths: torch.Tensor  # int64 [N], full trace lengths
    offsets: torch.Tensor  # int64 [N + 1] into the supervised rows
    features: torch.Tensor  # float16 [S, hidden]
    labels: torch.Tensor  # float32 [S], raw
    positions: torch.Tensor  # int64 [S]
    reference: torch.Tensor | None = None  # float32 [S], the attention reference; None in shards made without it
    index: dict = field(default_factory=dict)

    @property
    def num_traces(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        """Supervised (thinking) tokens."""
        return int(self.labels.numel())

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())

    def supervised_count(self, trace: int) -> int:
        return int(self.offsets[trace + 1] - self.offsets[trace])

    def trace_rows(self, trace: int) -> slice:
        return slice(int(self.offsets[trace]), int(self.offsets[trace + 1]))

    def rows(self, traces: Sequence[int]) -> torch.Tensor:
        """Row indices of the supervised tokens of `traces`, in order."""
        parts = [torch.arange(int(self.offsets[t]), int(self.offsets[t + 1])) for t in traces]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _labels_dir(directory: Path) -> Path:
    if (directory / LABELS_DIR / INDEX_FILE).is_file():
        return directory / LABELS_DIR
    if (directory / INDEX_FILE).is_file() and directory.name == LABELS_DIR:
        return directory  # the labels directory itself
    trace_dir = directory.parent if directory.name == LABELS_DIR else directory
    raise DynTSError(
        f"no label set in {directory}: {trace_dir / LABELS_DIR / INDEX_FILE} is missing; "
        f"run `dynts label {trace_dir}` first"
    )


def load_label_set(
    directory: str | Path, expected_model: str | None = None, expected_hidden_size: int | None = None
) -> LabelSet:
    """Read DIR/labels/index.json and every shard it lists, keeping the supervised (thinking) tokens."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    labels_dir = _labels_dir(directory)
    index_path = labels_dir / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise DynTSError(f"label index {index_path} is unreadable: {exc}; run `dynts label` again") from None
    if not isinstance(index, dict):
        raise DynTSError(f"label index {index_path} is malformed (not a JSON object); run `dynts label` again")
    model, hidden_size, shards = index.get("model"), index.get("hidden_size"), index.get("shards")
    if (
        not isinstance(model, str)
        or not _is_int(hidden_size)
        or hidden_size <= 0
        or not isinstance(shards, list)
        or not all(isinstance(s, str) for s in shards)
    ):
        raise DynTSError(
            f"label index {index_path} is malformed: it needs 'model' (string), 'hidden_size' "
            "(positive integer) and 'shards' (list of file names); run `dynts label` again"
        )
    if expected_model is not None and model != expected_model:
        raise DynTSError(
            f"labels in {labels_dir} were made with model {model!r}, not {expected_model!r}: "
            "a head only fits the model whose hidden states it was trained on"
        )
    if expected_hidden_size is not None and hidden_size != expected_hidden_size:
        raise DynTSError(
            f"labels in {labels_dir} hold hidden states of size {hidden_size} (model {model!r}), "
            f"but the expected hidden size is {expected_hidden_size}"
        )

    keys: list[tuple] = []
    spans_parts, length_parts, count_parts = [], [], []
    feature_parts, label_parts, position_parts, reference_parts = [], [], [], []
    for name in shards:
        path = labels_dir / name
        if not path.is_file():
            raise DynTSError(f"label shard {path} listed in {index_path} is missing; run `dynts label` again")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("token_ids", "offsets", "spans", "labels", "features")}
                reference = f.get_tensor("reference") if "reference" in f.keys() else None
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DynTSError(f"label shard {path} is corrupt ({first}); run `dynts label` again") from None
        shard = _check_shard(path, tensors, metadata, hidden_size, model)
        n = shard["spans"].shape[0]
        keys += shard["keys"]
        spans_parts.append(shard["spans"])
        offsets = shard["offsets"]
        length_parts.append(offsets[1:] - offsets[:-1])
        rows, positions, counts = [], [], []
        for i in range(n):
            start, think_start, think_end = int(offsets[i]), int(shard["spans"][i, 1]), int(shard["spans"][i, 2])
            rows.append(torch.arange(start + think_start, start + think_end))
            positions.append(torch.arange(think_start, think_end))
            counts.append(think_end - think_start)
        rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        labels = tensors["labels"][rows_t].float()
        if labels.numel() and (not torch.isfinite(labels).all() or (labels < 0).any()):
            raise DynTSError(
                f"label shard {path} is corrupt: labels of thinking tokens must be finite and "
                "non-negative (they are attention probabilities); run `dynts label` again"
            )
        features = tensors["features"][rows_t].to(torch.float16)
        if features.numel() and not torch.isfinite(features).all():
            raise DynTSError(f"label shard {path} holds non-finite hidden states; run `dynts label` again")
        if reference is not None and tuple(reference.shape) != tuple(tensors["labels"].shape):
            raise DynTSError(f"label shard {path} is corrupt: its attention reference does not match its labels")
        reference_parts.append(None if reference is None else reference[rows_t].float())
        feature_parts.append(features)
        label_parts.append(labels)
        position_parts.append(torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64))
        count_parts.append(torch.tensor(counts, dtype=torch.int64))
        del tensors

    counts = torch.cat(count_parts) if count_parts else torch.zeros(0, dtype=torch.int64)
    if int(counts.sum()) == 0:
        raise DynTSError(
            f"empty label set in {labels_dir}: no trace has supervised (thinking) tokens; "
            "collect more traces (or traces with thinking before the answer) and label again"
        )
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return LabelSet(
        directory=labels_dir.parent,
        model=model,
        hidden_size=hidden_size,
        answer_rule=str(index.get("answer_rule", "")),
        keys=keys,
        spans=torch.cat(spans_parts),
        lengths=torch.cat(length_parts),
        offsets=offsets,
        features=torch.cat(feature_parts),
        labels=torch.cat(label_parts),
        positions=torch.cat(position_parts),
        reference=None if any(r is None for r in reference_parts) else torch.cat(reference_parts),
        index=index,
    )


def _check_shard(path: Path, t: dict, metadata: dict, hidden_size: int, model: str) -> dict:
    def bad(why: str):
        return DynTSError(f"label shard {path} is corrupt: {why}; run `dynts label` again")

    names = ("token_ids", "offsets", "spans", "labels", "features")
    token_ids, offsets, spans, labels, features = (t[k] for k in names)
    if token_ids.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
        raise bad("token_ids and offsets must be 1-D")
    total, n = token_ids.numel(), offsets.numel() - 1
    offsets, spans = offsets.long(), spans.long()
    if int(offsets[0]) != 0 or int(offsets[-1]) != total or (n and bool((offsets[1:] < offsets[:-1]).any())):
        raise bad(f"offsets must rise from 0 to the {total} tokens")
    if tuple(spans.shape) != (n, 4):
        raise bad(f"spans has shape {tuple(spans.shape)}, expected ({n}, 4)")
    if tuple(labels.shape) != (total,):
        raise bad(f"labels has shape {tuple(labels.shape)}, expected ({total},)")
    if features.dim() != 2 or features.shape[0] != total:
        raise bad(f"features has shape {tuple(features.shape)}, expected ({total}, {hidden_size})")
    if features.shape[1] != hidden_size:
        raise DynTSError(
            f"label shard {path} holds hidden states of size {features.shape[1]}, but its index says "
            f"{hidden_size}; run `dynts label` again"
        )
    lengths = offsets[1:] - offsets[:-1]
    if n and bool(((spans[:, 1] < 0) | (spans[:, 1] > spans[:, 2]) | (spans[:, 2] > lengths)).any()):
        raise bad("a thinking span [think_start, think_end) lies outside its trace")
    if metadata.get("model") not in (None, model):
        raise DynTSError(
            f"label shard {path} was made with model {metadata['model']!r}, but its index says "
            f"{model!r}; run `dynts label` again"
        )
    if "keys" in metadata:
        try:
            raw = json.loads(metadata["keys"])
            if not isinstance(raw, list) or len(raw) != n:
                raise ValueError(f"{len(raw) if isinstance(raw, list) else 'no'} keys for {n} traces")
            keys = [tuple(k) if isinstance(k, list) else (None, k, 0) for k in raw]
        except (ValueError, TypeError) as exc:
            raise bad(f"its 'keys' metadata is unreadable ({exc})") from None
    else:  # no keys: every trace is its own problem
        keys = [(path.name, i, 0) for i in range(n)]
    return {"offsets": offsets, "spans": spans, "keys": keys}


# ----------------------------------------------------------------------------------------------- split


def split_traces(label_set: LabelSet, heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """(training traces, held-out traces), both sorted; only traces with supervised tokens take part.

    Traces are grouped by problem (dataset, id of their keys); about `heldout` of the problems, at least one,
    are held out. Deterministic for a given label set and seed.
    """
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(label_set.keys):
        if label_set.supervised_count(i) > 0:
            groups.setdefault(tuple(key[:2]) if len(key) >= 2 else (key,), []).append(i)
    names = list(groups)
    if len(names) < 2:
        raise DynTSError(
            f"the label set in {label_set.directory} has supervised tokens from {len(names)} problem(s); "
            "training needs at least 2 (one is held out to measure the head): collect more traces"
        )
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(len(names) - 1, max(1, round(heldout * len(names))))
    held = sorted(i for g in order[:n_held] for i in groups[names[g]])
    train = sorted(i for g in order[n_held:] for i in groups[names[g]])
    return train, held


# ----------------------------------------------------------------------------------------------- metrics


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
    out["loss"] = float(weighted_mse(scores, fn(labels), band, weight))
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


# ----------------------------------------------------------------------------------------------- training


def train_head(
    label_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    expected_model: str | None = None,
    progress: bool = True,
    compare: dict[str, str | Path] | None = None,
) -> dict:
    """Train an importance head on DIR/labels, save it to out_dir (head.safetensors + head.json), return metrics.

    compare: other heads (name -> checkpoint path) to evaluate on the same held-out traces, reported under
    metrics["compared"] (a head made for another model fails here, before any training)."""
    from tqdm import tqdm

    config = config or TrainConfig()
    transform = parse_transform(config.transform)
    device = config.resolved_device()
    label_set = load_label_set(label_dir, expected_model=expected_model)
    train, held = split_traces(label_set, config.heldout, config.seed)
    others = {
        name: ImportanceHead.load(path, expected_hidden_size=label_set.hidden_size)
        for name, path in (compare or {}).items()
    }

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = ImportanceHead(
            HeadConfig(
                hidden_size=label_set.hidden_size,
                layers=config.hidden,
                base_model=label_set.model,
                label_transform=config.transform,
            )
        )
    head.to(device)

    train_rows = label_set.rows(train)
    features = label_set.features[train_rows].to(device)
    targets = transform(label_set.labels[train_rows]).to(device)
    band = band_limits(config.band, targets)
    initial = evaluate_head(head, label_set, held, config.retention, config.transform, band, config.weight)
    n_tokens = int(train_rows.numel())
    steps_per_epoch = math.ceil(n_tokens / config.batch_tokens)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(math.floor(config.warmup * total_steps))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    generator = torch.Generator().manual_seed(config.seed + 1)

    started = time.perf_counter()
    head.train()
    epoch_loss, clipped = float("nan"), 0
    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress or None)
    for _ in bar:
        order = torch.randperm(n_tokens, generator=generator).to(device)
        total, seen = 0.0, 0
        for start in range(0, n_tokens, config.batch_tokens):
            batch = order[start : start + config.batch_tokens]
            loss, norm = train_step(
                head, optimizer, features[batch], targets[batch], band, config.weight, config.clip_norm
            )
            scheduler.step()
            clipped += config.clip_norm is not None and norm > config.clip_norm
            total += loss * batch.numel()
            seen += batch.numel()
        epoch_loss = total / max(seen, 1)
        bar.set_postfix(loss=f"{epoch_loss:.4g}")
    bar.close()
    train_time = time.perf_counter() - started
    heavy_share = float(((targets >= band[0]) & (targets < band[1])).float().mean())
    del features, targets

    final = evaluate_head(head, label_set, held, config.retention, config.transform, band, config.weight)
    metrics = {
        "spearman": final["spearman"],
        "kendall": final["kendall"],
        "topk_recall": final["topk_recall"],
        "heldout_loss": final["loss"],
        "heldout_loss_initial": initial["loss"],
        "train_loss_final": epoch_loss,
        "retention": config.retention,
        "baseline_recency": evaluate_recency(label_set, held, config.retention),
        "baseline_attention": evaluate_reference(label_set, held, config.retention),
        "random_init": {k: initial[k] for k in RANKING},
        "train_time_s": round(train_time, 3),
        "traces_train": len(train),
        "traces_heldout": final["traces"],
        "tokens_train": n_tokens,
        "tokens_heldout": final["tokens"],
    }
    for name, other in others.items():
        scores = evaluate_head(other, label_set, held, config.retention)
        metrics.setdefault("compared", {})[name] = {k: scores[k] for k in RANKING}
    training = {k: v for k, v in asdict(config).items() if k not in ("hidden", "transform", "device")}
    training.update(
        {
            "data": str(label_set.directory.resolve()),
            "model": label_set.model,
            "answer_rule": label_set.answer_rule,
            "traces": label_set.num_traces,
            "tokens": label_set.total_tokens,
            "supervised_tokens": label_set.num_tokens,
            "steps": total_steps,
            "warmup_steps": warmup_steps,
            "loss": f"weighted MSE, weight {config.weight:g} where the transformed label is in "
            f"[{band[0]:.4g}, {band[1]:.4g}) ({config.band}: {heavy_share:.1%} of training tokens)",
            "band_limits": [x if math.isfinite(x) else None for x in band],
            "steps_clipped": int(clipped),
            "device": str(device),
        }
    )
    training["betas"] = list(config.betas)
    head.config.training = training
    head.config.metrics = metrics
    head.to("cpu").eval()
    head.save(out_dir)
    return metrics
