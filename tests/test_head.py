"""Importance head checkpoints: round trip, hidden-size check, broken and missing files."""

from __future__ import annotations

import json

import pytest
import torch

from dynts.errors import DynTSError
from dynts.models.importance_head import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    HeadConfig,
    ImportanceHead,
    random_head,
    resolve_head,
)


def saved_head(tmp_path, hidden=32, layers=(16, 8)):
    head = random_head(hidden, layers=layers, seed=3, base_model="tiny")
    head.config.metrics = {"spearman": 0.5}
    head.save(tmp_path / "head")
    return head, tmp_path / "head"


def test_architecture_and_non_negative_scores():
    head = ImportanceHead(HeadConfig(hidden_size=12, layers=(8, 4)))
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 8), (8, 4), (4, 1)]
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, torch.nn.Softplus) for m in head.net) == 3
    with torch.no_grad():
        scores = head(torch.randn(2, 5, 12) * 10)
    assert scores.shape == (2, 5) and torch.all(scores >= 0)


def test_round_trip_gives_identical_scores(tmp_path):
    head, path = saved_head(tmp_path)
    assert (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()
    x = torch.randn(4, 7, 32)
    for source in (path, path / WEIGHTS_FILE, path / CONFIG_FILE):
        loaded = ImportanceHead.load(source, expected_hidden_size=32)
        with torch.no_grad():
            assert torch.equal(loaded(x), head(x))
        assert loaded.config.layers == (16, 8)
        assert loaded.config.base_model == "tiny"
        assert loaded.config.metrics == {"spearman": 0.5}
        assert not loaded.training


def test_random_head_is_deterministic():
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert torch.equal(random_head(10, seed=1)(x), random_head(10, seed=1)(x))
        assert not torch.equal(random_head(10, seed=1)(x), random_head(10, seed=2)(x))


def test_mismatched_hidden_size_refused(tmp_path):
    _, path = saved_head(tmp_path)
    with pytest.raises(DynTSError, match="hidden size 32"):
        ImportanceHead.load(path, expected_hidden_size=576)


def test_missing_files(tmp_path):
    with pytest.raises(DynTSError, match="no importance head"):
        ImportanceHead.load(tmp_path / "nowhere")
    _, path = saved_head(tmp_path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(DynTSError, match="no importance head"):
        ImportanceHead.load(path)
    _, path = saved_head(tmp_path / "again")
    (path / CONFIG_FILE).unlink()
    with pytest.raises(DynTSError, match="no importance head"):
        ImportanceHead.load(path)


def test_corrupt_weights(tmp_path):
    _, path = saved_head(tmp_path)
    (path / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DynTSError, match="corrupt"):
        ImportanceHead.load(path)


def test_truncated_weights(tmp_path):
    _, path = saved_head(tmp_path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DynTSError, match="corrupt"):
        ImportanceHead.load(path)


def test_weights_that_do_not_match_the_config(tmp_path):
    _, path = saved_head(tmp_path)
    config = json.loads((path / CONFIG_FILE).read_text())
    config["layers"] = [16, 4]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DynTSError, match="do not match"):
        ImportanceHead.load(path)


@pytest.mark.parametrize(
    "text", ["{not json", '{"layers": [4]}', '{"hidden_size": 32, "colour": "red"}', '{"hidden_size": -1}']
)
def test_unreadable_config(tmp_path, text):
    _, path = saved_head(tmp_path)
    (path / CONFIG_FILE).write_text(text)
    with pytest.raises(DynTSError):
        ImportanceHead.load(path)


def test_resolve_head_checks_the_model(tmp_path, make_tiny):
    lm = make_tiny("llama", name="tiny-llama")  # hidden size 64, no head ships for it
    with pytest.raises(DynTSError, match="needs an importance head"):
        resolve_head(None, lm)
    _, path = saved_head(tmp_path, hidden=32)
    with pytest.raises(DynTSError, match="hidden size"):
        resolve_head(path, lm)
    head = random_head(64)
    head.save(tmp_path / "ok")
    assert resolve_head(tmp_path / "ok", lm).config.hidden_size == 64
