"""dynts head import: a checkpoint shaped like the reference pipeline's (a transformers model directory whose
predictor sits under is_head.*, saved in safetensors shards) -> our head format, with identical scores; and the
refusals (no predictor, shapes that do not chain, an unreadable shard), each before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dynts.errors import DynTSError
from dynts.models.importance_head import CONFIG_FILE, ImportanceHead
from dynts.predictor.head_import import import_reference_head, save_imported_head

SRC = Path(__file__).resolve().parents[1] / "src"
HIDDEN = 64


def reference_predictor(widths=(HIDDEN, 128, 48, 1), seed=0) -> nn.Sequential:
    """The reference regression predictor: bias-free Linear layers, each followed by a Softplus."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out, bias=False), nn.Softplus()]
    predictor = nn.Sequential(*layers)
    with torch.no_grad():  # weights large enough that Softplus is far from linear
        for p in predictor.parameters():
            p.normal_(0, 2.0 / p.shape[1] ** 0.5)
    return predictor


def save_checkpoint(directory: Path, predictor: nn.Module | None, shard="30KB", single=False) -> Path:
    """A tiny Llama with the predictor attached as `is_head`, saved by transformers' save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model = LlamaForCausalLM(config)
    if predictor is not None:
        model.is_head = predictor
    model.save_pretrained(directory, max_shard_size="10GB" if single else shard)
    return directory


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dynts", "head", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_import_round_trip_gives_the_reference_scores(tmp_path):
    predictor = reference_predictor()
    checkpoint = save_checkpoint(tmp_path / "ckpt", predictor)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    names = sorted(n for n in index if n.startswith("is_head."))
    assert names == ["is_head.0.weight", "is_head.2.weight", "is_head.4.weight"]
    assert len({index[n] for n in names}) >= 2  # the predictor is spread over shards

    out = tmp_path / "head"
    result = run_cli("import", checkpoint, "--out", out, "--base-model", "org/tiny-base")
    assert result.returncode == 0, result.stderr
    assert "64 -> 128 -> 48 -> 1" in result.stdout

    head = ImportanceHead.load(out, expected_hidden_size=HIDDEN)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["hidden_size"] == HIDDEN and config["layers"] == [128, 48] and config["base_model"] == "org/tiny-base"
    assert config["training"]["tensors"] == names
    x = torch.randn(3, 17, HIDDEN) * 3
    with torch.no_grad():
        expected = predictor(x).squeeze(-1)
        assert torch.equal(head(x), expected)
        # the final Softplus counts: without it the scores would differ (and could be negative)
        assert not torch.allclose(head(x), predictor[:-1](x).squeeze(-1), atol=1e-3)
    shown = run_cli("show", out)
    assert shown.returncode == 0 and json.loads(shown.stdout)["hidden_size"] == HIDDEN


def test_single_file_checkpoint_and_default_base_model_name(tmp_path):
    predictor = reference_predictor(widths=(HIDDEN, 32, 1), seed=1)  # any depth that chains to one score
    checkpoint = save_checkpoint(tmp_path / "my-model", predictor, single=True)
    assert (checkpoint / "model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors.index.json").exists()
    imported = import_reference_head(checkpoint)
    assert imported.head.config.base_model == "my-model" and imported.head.config.layers == (32,)
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        assert torch.equal(imported.head(x), predictor(x).squeeze(-1))
    config = json.loads((checkpoint / "config.json").read_text())
    config["_name_or_path"] = "org/base-from-config"  # what transformers 4.x writes: the base model's name
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert import_reference_head(checkpoint).head.config.base_model == "org/base-from-config"


def test_half_precision_weights_are_widened(tmp_path):
    weights = {"is_head.0.weight": torch.randn(16, 8), "is_head.2.weight": torch.randn(1, 16)}
    checkpoint = write_tensors(tmp_path / "ckpt", {k: v.to(torch.bfloat16) for k, v in weights.items()})
    imported = import_reference_head(checkpoint)
    linears = [m for m in imported.head.net if isinstance(m, nn.Linear)]
    assert all(m.weight.dtype == torch.float32 for m in linears)
    assert torch.equal(linears[1].weight, weights["is_head.2.weight"].to(torch.bfloat16).float())
    assert imported.head.config.hidden_size == 8 and imported.head.config.training["checkpoint_dtype"] == "bfloat16"


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    "tensors,config,message",
    [
        ({"model.embed.weight": torch.zeros(4, 8)}, None, "holds no importance predictor"),
        (
            {"is_head.0.weight": torch.zeros(16, 8), "is_head.2.weight": torch.zeros(1, 12)},
            None,
            "shapes do not chain",
        ),
        ({"is_head.0.weight": torch.zeros(16, 8), "is_head.2.weight": torch.zeros(1, 16)}, {"hidden_size": 12}, "12"),
        ({"is_head.0.weight": torch.zeros(16, 8), "is_head.2.weight": torch.zeros(2, 16)}, None, "classification"),
        ({"is_head.0.weight": torch.zeros(1, 8), "is_head.0.bias": torch.zeros(1)}, None, "bias-free"),
        ({"is_head.0.weight": torch.zeros(4, 8), "is_head.1.weight": torch.zeros(1, 4)}, None, "not 0, 2, 4"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, tensors, config, message):
    checkpoint = write_tensors(tmp_path / "ckpt", tensors, config)
    with pytest.raises(DynTSError, match=message):
        import_reference_head(checkpoint)


def test_cli_errors_exit_2_and_write_nothing(tmp_path):
    plain = save_checkpoint(tmp_path / "plain", None, single=True)  # a model without a predictor
    out = tmp_path / "head"
    result = run_cli("import", plain, "--out", out)
    assert result.returncode == 2 and "no importance predictor" in result.stderr and not out.exists()

    broken = save_checkpoint(tmp_path / "broken", reference_predictor())
    shard = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]["is_head.2.weight"]
    (broken / shard).write_bytes((broken / shard).read_bytes()[:100])  # a truncated shard
    result = run_cli("import", broken, "--out", out)
    assert result.returncode == 2 and "cannot read is_head.2.weight" in result.stderr and not out.exists()

    result = run_cli("import", tmp_path / "missing", "--out", out)
    assert result.returncode == 2 and "is not a directory" in result.stderr and not out.exists()

    good = save_checkpoint(tmp_path / "good", reference_predictor(), single=True)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DynTSError, match="not an empty directory"):
        save_imported_head(import_reference_head(good), out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
