"""Importance-head training on synthetic label shards written in the exact `dynts label` format."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dynts.errors import DynTSError
from dynts.models.importance_head import HeadConfig, ImportanceHead
from dynts.predictor.labels import load_label_set
from dynts.predictor.objective import (
    band_limits,
    loss_weights,
    lr_factor,
    parse_band,
    parse_transform,
    train_step,
    weighted_mse,
)
from dynts.predictor.ranking import evaluate_head, evaluate_recency, evaluate_reference, ranking_metrics
from dynts.predictor.train import TrainConfig, split_traces, train_head

HIDDEN = 16
MODEL = "tiny/test-model"


def true_score(features: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The hidden function a head should learn: transformed label (scale:10000) before noise."""
    return torch.nn.functional.softplus(2.0 * features.float() @ w)


def write_label_set(
    root,
    traces=40,
    hidden=HIDDEN,
    model=MODEL,
    shard_size=16,
    seed=0,
    think=True,
    samples=1,
    noise=0.05,
    reference=None,
):
    """Write root/labels/{index.json, labels-*.safetensors} as `dynts label` does; returns the hidden weights.

    reference: None (shards without an attention reference, as labelled before it existed), "labels" (the
    reference equals the labels) or "reversed" (it ranks the thinking tokens in the opposite order)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, generator=gen)
    w = w / w.norm()
    out = root / "labels"
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for t in range(traces):
        prompt_len = 5
        n_think = int(torch.randint(30, 60, (1,), generator=gen)) if think else 0
        length = prompt_len + n_think + 6
        think_start, think_end = prompt_len, prompt_len + n_think
        features = torch.randn(length, hidden, generator=gen).to(torch.float16)
        target = true_score(features, w) + noise * torch.randn(length, generator=gen).abs()
        labels = torch.zeros(length)
        labels[think_start:think_end] = target[think_start:think_end] / 10000.0
        attention = {None: None, "labels": labels, "reversed": -labels}[reference]
        items.append(
            {
                "reference": attention,
                "ids": torch.randint(0, 1000, (length,), generator=gen, dtype=torch.int32),
                "spans": [prompt_len, think_start, think_end, think_end],
                "labels": labels,
                "features": features,
                "key": ["synthetic", f"p{t // samples}", t % samples],
            }
        )
    shards = []
    for s in range(0, traces, shard_size):
        chunk = items[s : s + shard_size]
        offsets = [0]
        for item in chunk:
            offsets.append(offsets[-1] + len(item["ids"]))
        name = f"labels-{len(shards):05d}.safetensors"
        tensors = {
            "token_ids": torch.cat([i["ids"] for i in chunk]),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "spans": torch.tensor([i["spans"] for i in chunk], dtype=torch.int64),
            "labels": torch.cat([i["labels"] for i in chunk]),
            "features": torch.cat([i["features"] for i in chunk]),
        }
        if reference is not None:
            tensors["reference"] = torch.cat([i["reference"] for i in chunk])
        save_file(
            tensors,
            str(out / name),
            metadata={"model": model, "keys": json.dumps([i["key"] for i in chunk])},
        )
        shards.append(name)
    index = {
        "model": model,
        "hidden_size": hidden,
        "shards": shards,
        "traces": traces,
        "tokens": sum(len(i["ids"]) for i in items),
        "answer_rule": "synthetic",
    }
    (out / "index.json").write_text(json.dumps(index))
    return w


def tiny_config(**kw):
    base = dict(hidden=(32, 8), epochs=25, lr=1e-2, batch_tokens=128, heldout=0.2, seed=0, retention=0.4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    write_label_set(root)
    out = root / "head"
    metrics = train_head(root, out, tiny_config(), expected_model=MODEL, progress=False)
    return root, out, metrics


def test_training_beats_initial_and_random_heads(trained):
    _, _, m = trained
    assert m["heldout_loss"] < 0.5 * m["heldout_loss_initial"]
    assert m["spearman"] > 0.8 and m["kendall"] > 0.6
    assert m["spearman"] > m["random_init"]["spearman"] + 0.2
    assert m["topk_recall"] > m["baseline_recency"]["topk_recall"]
    assert abs(m["baseline_recency"]["spearman"]) < 0.3  # labels do not depend on position here
    assert m["traces_train"] + m["traces_heldout"] == 40 and m["traces_heldout"] == 8
    assert m["tokens_train"] > 0 and m["train_time_s"] >= 0


def test_checkpoint_holds_metrics_and_checks_hidden_size(trained):
    root, out, m = trained
    saved = json.loads((out / "head.json").read_text())
    assert saved["metrics"]["spearman"] == pytest.approx(m["spearman"])
    assert saved["metrics"]["baseline_recency"] == m["baseline_recency"]
    assert saved["base_model"] == MODEL and saved["label_transform"] == "scale:10000"
    assert saved["layers"] == [32, 8] and saved["training"]["epochs"] == 25
    assert saved["training"]["traces"] == 40
    head = ImportanceHead.load(out, expected_hidden_size=HIDDEN)
    label_set = load_label_set(root)
    _, held = split_traces(label_set, 0.2, 0)
    band = tuple(math.inf if x is None else x for x in saved["training"]["band_limits"])  # the training's band
    again = evaluate_head(head, label_set, held, 0.4, band=band)
    assert again["spearman"] == pytest.approx(m["spearman"], abs=1e-6)
    assert again["loss"] == pytest.approx(m["heldout_loss"], rel=1e-5)
    with pytest.raises(DynTSError, match="hidden size"):
        ImportanceHead.load(out, expected_hidden_size=HIDDEN + 1)


def test_transforms():
    scale = parse_transform("scale:10000")
    assert scale(3e-4) == pytest.approx(3.0)
    power = parse_transform("pow:0.3")
    for x in (1e-4, 0.01, 0.5):
        assert power(x) == pytest.approx(10 * x**0.3 / 0.3)
    t = power(torch.tensor([0.0, 0.01]))
    assert t[0] == 0 and t[1].item() == pytest.approx(10 * 0.01**0.3 / 0.3, rel=1e-6)
    for bad in ("", "scale", "scale:", "scale:abc", "scale:-1", "pow:0", "pow:nan", "log:2", None):
        with pytest.raises(DynTSError):
            parse_transform(bad)


def test_rank_transform_is_the_rank_quantile_within_each_trace():
    rank = parse_transform("rank:10")
    labels = torch.tensor([0.3, 0.1, 0.2, 5.0, 5.0, 1.0, 7.0])
    assert rank(labels, [3, 4]).tolist() == [10.0, 0.0, 5.0, 5.0, 5.0, 0.0, 10.0]  # ties share their mean rank
    assert rank(labels * 1e-4, [3, 4]).tolist() == rank(labels, [3, 4]).tolist()  # the scale is gone
    assert rank(labels).tolist() != rank(labels, [3, 4]).tolist()  # without counts: one trace
    assert rank(torch.tensor([2.0]), [1]).tolist() == [5.0]
    with pytest.raises(DynTSError, match="sum to 6"):
        rank(labels, [3, 3])


def test_a_rank_head_learns_the_ranking_whatever_each_traces_scale(tmp_path):
    """Labels of every trace scaled by its own factor (as 1/L scales them): a rank:10 head still ranks them."""
    write_label_set(tmp_path)
    for shard in sorted((tmp_path / "labels").glob("labels-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(shard))
        offsets = tensors["offsets"].tolist()
        for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
            tensors["labels"][a:b] *= 10.0 ** (i % 3 - 1)
        save_file(tensors, str(shard), metadata=metadata)
    m = train_head(tmp_path, tmp_path / "head", tiny_config(transform="rank:10"), expected_model=MODEL, progress=False)
    assert m["spearman"] > 0.8 and m["heldout_loss"] < 0.5 * m["heldout_loss_initial"]
    head = ImportanceHead.load(tmp_path / "head")
    assert head.config.label_transform == "rank:10"
    label_set = load_label_set(tmp_path)
    _, held = split_traces(label_set, 0.2, 0)
    assert evaluate_head(head, label_set, held, 0.4, band=tuple(head.config.training["band_limits"]))[
        "loss"
    ] == pytest.approx(m["heldout_loss"], rel=1e-5)


def test_weighted_loss_uses_weight_five_in_four_to_five():
    target = torch.tensor([3.99, 4.0, 4.5, 4.999, 5.0, 10.0])
    assert loss_weights(target).tolist() == [1, 5, 5, 5, 1, 1]
    pred = target + 1.0
    assert float(weighted_mse(pred, target)) == pytest.approx((1 + 5 + 5 + 5 + 1 + 1) / 6)


def test_lr_schedule_warms_up_then_decays_to_zero():
    total, warm = 100, 10
    factors = [lr_factor(s, total, warm) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:11]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.01 and lr_factor(total, total, warm) == pytest.approx(0.0)


def test_ranking_metrics():
    true = torch.arange(10.0)
    perfect = ranking_metrics(true * 3 + 1, true, 0.4)
    assert perfect == {"spearman": pytest.approx(1.0), "kendall": pytest.approx(1.0), "topk_recall": 1.0}
    worst = ranking_metrics(-true, true, 0.4)
    assert worst["spearman"] == pytest.approx(-1.0) and worst["kendall"] == pytest.approx(-1.0)
    assert worst["topk_recall"] == 0.0
    pred, label = torch.tensor([9.0, 8, 0, 0, 0, 0, 0, 0, 0, 0]), torch.tensor([9.0, 0, 8, 0, 0, 0, 0, 0, 0, 0])
    half = ranking_metrics(pred, label, 0.2)
    assert half["topk_recall"] == 0.5  # k = 2: one of the two true top tokens found
    assert ranking_metrics(torch.ones(5), true[:5], 0.4)["spearman"] is None  # constant prediction
    assert ranking_metrics([1.0], [2.0], 0.4)["topk_recall"] == 1.0  # k = max(1, floor(0.4))


def test_recency_baseline_and_split(tmp_path):
    write_label_set(tmp_path, traces=20, samples=2, shard_size=7)
    label_set = load_label_set(tmp_path)
    assert label_set.num_traces == 20 and label_set.features.dtype == torch.float16
    assert label_set.features.shape == (label_set.num_tokens, HIDDEN)
    train, held = split_traces(label_set, 0.2, seed=3)
    assert (train, held) == split_traces(label_set, 0.2, seed=3)
    assert sorted(train + held) == list(range(20)) and len(held) == 4
    problems = lambda ts: {label_set.keys[t][1] for t in ts}
    assert not problems(train) & problems(held)  # samples of one problem stay together
    # labels rising with position: the recency baseline ranks perfectly
    label_set.labels = label_set.positions.float()
    assert evaluate_recency(label_set, held, 0.4) == {
        "spearman": pytest.approx(1.0),
        "kendall": pytest.approx(1.0),
        "topk_recall": 1.0,
    }


def test_missing_index_says_run_label(tmp_path):
    with pytest.raises(DynTSError, match="dynts label"):
        load_label_set(tmp_path)
    with pytest.raises(DynTSError, match="dynts label"):
        train_head(tmp_path, tmp_path / "head", tiny_config(), progress=False)


def test_empty_label_set(tmp_path):
    write_label_set(tmp_path, traces=4, think=False)
    with pytest.raises(DynTSError, match="empty label set"):
        load_label_set(tmp_path)


def test_corrupt_shard_and_mismatched_model(tmp_path):
    write_label_set(tmp_path, traces=4)
    with pytest.raises(DynTSError, match="model"):
        load_label_set(tmp_path, expected_model="other/model")
    with pytest.raises(DynTSError, match="hidden size"):
        load_label_set(tmp_path, expected_hidden_size=HIDDEN * 2)
    (tmp_path / "labels" / "labels-00000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DynTSError, match="corrupt"):
        load_label_set(tmp_path)


def test_train_config_validation():
    TrainConfig()
    for bad in (
        dict(hidden=()),
        dict(hidden=(0,)),
        dict(epochs=0),
        dict(lr=-1),
        dict(lr=math.nan),
        dict(weight_decay=-0.1),
        dict(betas=(0.9, 1.0)),
        dict(warmup=1.0),
        dict(batch_tokens=0),
        dict(transform="scale:x"),
        dict(heldout=0.0),
        dict(heldout=1.0),
        dict(retention=0.0),
        dict(retention=1.5),
        dict(seed=1.5),
    ):
        with pytest.raises(DynTSError):
            TrainConfig(**bad)


def test_quantile_band_weights_the_top_share_of_training_labels():
    targets = torch.arange(100.0)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    low, high = band_limits("quantile:0.9", targets)
    assert (low, high) == (90.0, math.inf)
    weights = loss_weights(targets, (low, high))
    assert int((weights == 5).sum()) == 10 and bool((weights[targets >= 90] == 5).all())
    assert band_limits("quantile:0.5:0.8", targets) == (50.0, 80.0)
    assert int((loss_weights(targets, band_limits("quantile:0.5:0.8", targets)) == 5).sum()) == 30
    # the same share whatever the scale of the labels (a value band would not follow)
    assert int((loss_weights(targets / 1000, band_limits("quantile:0.9", targets / 1000)) == 5).sum()) == 10
    assert band_limits("value:4:5", targets) == (4.0, 5.0)
    assert bool((loss_weights(targets, band_limits("none", targets)) == 1).all())
    assert parse_band("quantile:0.25:0.75") == ("quantile", 0.25, 0.75)
    for bad in ("", "quantile", "quantile:1.5", "quantile:0.8:0.2", "value:5", "value:5:4", "top:0.1", None):
        with pytest.raises(DynTSError):
            parse_band(bad)
    with pytest.raises(DynTSError):
        TrainConfig(band="quantile:2")


def test_gradient_clipping_bounds_the_step():
    """With plain SGD (lr 1) the update is the gradient: clipped to norm 1, unclipped far larger."""
    features = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(0))
    targets = torch.full((64,), 1000.0)  # far from a fresh head's output: a huge gradient

    def step(clip):
        torch.manual_seed(0)
        head = ImportanceHead(HeadConfig(HIDDEN, (8,)))
        before = torch.cat([p.detach().flatten().clone() for p in head.parameters()])
        optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
        loss, norm = train_step(head, optimizer, features, targets, (4.0, 5.0), clip_norm=clip)
        after = torch.cat([p.detach().flatten() for p in head.parameters()])
        grads = torch.cat([p.grad.flatten() for p in head.parameters()])
        return norm, float((after - before).norm()), float(grads.norm())

    raw_norm, raw_update, _ = step(None)
    norm, update, grad_after = step(1.0)
    assert norm == pytest.approx(raw_norm) and raw_norm > 10.0
    assert raw_update == pytest.approx(raw_norm, rel=1e-4)
    assert update == pytest.approx(1.0, rel=1e-4) and grad_after == pytest.approx(1.0, rel=1e-4)
    assert TrainConfig().clip_norm == 1.0
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(DynTSError):
            TrainConfig(clip_norm=bad)


def test_attention_reference_metric_and_compared_heads(tmp_path, trained):
    _, shipped, trained_metrics = trained
    assert trained_metrics["baseline_attention"] is None  # shards labelled without a reference
    write_label_set(tmp_path, reference="labels")
    metrics = train_head(tmp_path, tmp_path / "head", tiny_config(epochs=2), progress=False, compare={"other": shipped})
    assert metrics["baseline_attention"] == {
        "spearman": pytest.approx(1.0),
        "kendall": pytest.approx(1.0),
        "topk_recall": 1.0,
    }
    # the same synthetic data and split: the compared head scores what it scored when it was trained
    assert metrics["compared"]["other"]["spearman"] == pytest.approx(trained_metrics["spearman"], abs=1e-6)
    saved = json.loads((tmp_path / "head" / "head.json").read_text())
    assert saved["metrics"]["baseline_attention"]["topk_recall"] == 1.0
    assert saved["training"]["clip_norm"] == 1.0 and saved["training"]["band"] == "quantile:0.75:0.9"
    reversed_dir = tmp_path / "reversed"
    write_label_set(reversed_dir, reference="reversed")
    label_set = load_label_set(reversed_dir)
    _, held = split_traces(label_set, 0.2, 0)
    worst = evaluate_reference(label_set, held, 0.4)
    assert worst["spearman"] == pytest.approx(-1.0) and worst["topk_recall"] < 0.1
