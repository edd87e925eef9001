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

Fit. Labels are transformed (`scale:S` -> S*x; `pow:P` -> 10*x^P/P; `rank:S` -> S x the label's rank quantile
within its trace, objective.parse_transform), the loss is a weighted MSE (weight 5 where
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
attention reference means it predicts the answer's needs better than accumulated attention does."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynts.config import DEFAULT_BAND
from dynts.errors import DynTSError
from dynts.models.importance_head import HeadConfig, ImportanceHead
from dynts.predictor.labels import LabelSet, is_int, load_label_set
from dynts.predictor.objective import (
    HEAVY_WEIGHT,
    band_limits,
    lr_factor,
    parse_band,
    parse_transform,
    train_step,
)
from dynts.predictor.ranking import RANKING, evaluate_head, evaluate_recency, evaluate_reference


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
        if not is_int(self.epochs) or self.epochs < 1:
            raise DynTSError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not _finite(self.lr) or self.lr <= 0:
            raise DynTSError(f"learning rate must be a positive number, got {self.lr!r}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise DynTSError(f"weight decay must be a non-negative number, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise DynTSError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not _finite(self.warmup) or not 0.0 <= self.warmup < 1.0:
            raise DynTSError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if not is_int(self.batch_tokens) or self.batch_tokens < 1:
            raise DynTSError(f"batch_tokens must be a positive integer, got {self.batch_tokens!r}")
        parse_transform(self.transform)
        parse_band(self.band)
        if not _finite(self.weight) or self.weight < 1.0:
            raise DynTSError(f"the heavy loss weight must be a number >= 1, got {self.weight!r}")
        if self.clip_norm is not None and (not _finite(self.clip_norm) or self.clip_norm <= 0):
            raise DynTSError(f"gradient clipping norm must be a positive number (or None: off), got {self.clip_norm!r}")
        if not _finite(self.heldout) or not 0.0 < self.heldout < 1.0:
            raise DynTSError(f"heldout is a fraction of the traces in (0, 1), got {self.heldout!r}")
        if not is_int(self.seed):
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


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    targets = transform(label_set.labels[train_rows], [label_set.supervised_count(t) for t in train]).to(device)
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
