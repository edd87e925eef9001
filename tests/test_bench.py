"""`dynts bench` and its roofline: the issue's bound figures, the budget's length schedule, the command on a tiny
shape (in a subprocess, and as JSON), and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dynts.cli.main import main
from dynts.config import BudgetConfig
from dynts.experiments.roofline import (
    cached_tokens_per_step,
    kv_bytes_per_token,
    parameter_bytes,
    roofline,
    streamed_weight_bytes,
)

TINY_ARGS = [
    "--batch",
    "2",
    "--budget",
    "24",
    "--window",
    "4",
    "--ratio",
    "0.5",
    "--prompt-len",
    "6",
    "--new-tokens",
    "30",
    "--policy",
    "dynts",
    "--head-layers",
    "16,8",
    "--bandwidth",
    "5",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory):
    """A model directory holding only a config: a tiny Llama."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-shape")
    LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    ).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("shape, issue_bound", [("r1-qwen-7b", 2870), ("r1-llama-8b", 2060)])
def test_roofline_reproduces_the_issue(shape, issue_bound):
    """Batch 20, every row at B=5000 tokens, 3.0 TB/s, bf16: the issue's 2870 / 2060 TPS."""
    from transformers import AutoModelForCausalLM

    from dynts.models.shapes import shape_config

    config = shape_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    bound = roofline(
        parameter_bytes(model),
        kv_bytes_per_token(config, torch.bfloat16),
        20,
        128,
        8192,
        BudgetConfig(5000, 2000, 0.4),
        3000.0,
    )
    assert bound.tps_bound_at_max == pytest.approx(issue_bound, rel=0.01)
    assert bound.max_cached_tokens == 5000
    assert 3000 < bound.mean_cached_tokens < 5000  # the schedule's mean: the bound it gives is higher
    assert bound.tps_bound > bound.tps_bound_at_max


def meta_model(shape):
    from transformers import AutoModelForCausalLM

    from dynts.models.shapes import shape_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.bfloat16)


def test_streamed_weights_leave_out_the_embedding_table():
    """A step reads the batch's rows of an untied embedding table, not the table (1.09 GB at R1-Qwen-7B); a table
    tied to the LM head is streamed by the head, once."""
    model = meta_model("r1-qwen-7b")
    table = model.get_input_embeddings().weight
    assert not model.config.tie_word_embeddings
    left_out = parameter_bytes(model) - streamed_weight_bytes(model, 20)
    assert left_out == table.numel() * 2 - 20 * table.shape[1] * 2
    assert 1.08e9 < left_out < 1.10e9
    tied = meta_model("smollm2-135m")
    assert tied.config.tie_word_embeddings and streamed_weight_bytes(tied, 20) == parameter_bytes(tied)


def test_largest_batch_sizes_what_a_row_allocates(make_tiny):
    """bytes_per_row (what --batch max divides the free memory by) covers everything a fast-path row allocates:
    its K/V, slot buffers (per-head ones included) and row buffers, for the policies with the most of them."""
    from dynts.experiments.bench import bytes_per_row
    from dynts.fast.fast_engine import FastEngine
    from dynts.fast.profile import DecodeProfile
    from dynts.models.importance_head import random_head

    lm = make_tiny("qwen2")
    for policy in ("h2o", "snapkv", "dynts"):
        head = random_head(lm.hidden_size) if policy == "dynts" else None
        engine = FastEngine(lm, policy, BudgetConfig(24, 4, 0.5), batch_size=3, head=head)
        engine.last_profile = DecodeProfile()
        stepper = engine.stepper(3, 24)
        cache = stepper.cache
        buffers = [*cache.slot.values()]
        for layer in cache.layers:
            buffers += [layer.keys, layer.values, *layer.slot.values(), *layer.rows.values()]
        allocated = sum(b.numel() * b.element_size() for b in buffers) // 3
        stepper.close()
        assert bytes_per_row(engine, 24, 30) >= allocated > 24 * kv_bytes_per_token(lm.model.config, lm.dtype)


def test_length_schedule():
    # prompt 10, B=16, W=4, r=0.5 -> compress at 16 to 4 + 6 = 10, grow again
    assert cached_tokens_per_step(10, 10, BudgetConfig(16, 4, 0.5)) == [11, 12, 13, 14, 15, 16, 11, 12, 13]
    assert cached_tokens_per_step(3, 4, BudgetConfig(None)) == [4, 5, 6]


def test_bench_command_prints_every_figure(tiny_shape):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("DYNTS_TEST_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-m", "dynts", "bench", "--shape", tiny_shape, *TINY_ARGS, "--compare-eager"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for figure in (
        "end-to-end TPS (decode)",
        "forward-only TPS",
        "ms per step",
        "peak memory (process max RSS)",
        "roofline: bytes/step",
        "-> bound",
        "of the bound",
        "the worst case: bound",
        "transformers eager",
        "ratio",
        "eviction + scoring",
        "compressions",
        "packed weights",
    ):
        assert figure in out, figure


def test_bench_json(tiny_shape, capsys):
    assert main(["bench", "--shape", tiny_shape, *TINY_ARGS, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ours = report["ours"]
    for key in (
        "tps",
        "tps_forward",
        "tps_with_prefill",
        "ms_per_step",
        "peak_memory_bytes",
        "shares",
        "eviction_scoring_share",
        "kernel",
        "graphs",
    ):
        assert key in ours, key
    assert ours["generated_tokens"] == 2 * 30 and ours["compressions"] >= 2
    assert set(ours["shares"]) == {"forward", "scoring", "sampling", "eviction"}
    assert report["roofline"]["bandwidth_gbps"] == 5 and not report["bandwidth_measured"]
    assert report["fraction"] == pytest.approx(ours["tps"] / report["roofline"]["tps_bound"])
    assert report["eager"] is None and report["batch"] == 2 and ours["kernel"] == "sdpa" and not ours["graphs"]
    # the packed copies (CPU default): per layer QKV 128 x 64, output 64 x 64, gate/up 256 x 64, down 64 x 128;
    # the LM head 128 x 64
    weights = 2 * (128 * 64 + 64 * 64 + 256 * 64 + 64 * 128) + 128 * 64
    assert ours["packed_bytes"] == weights * getattr(torch, report["dtype"]).itemsize


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "no-such-shape"], "unknown shape"),
        (["--window", "30"], "--window (30) must be smaller than --budget (24)"),
        (["--batch", "max"], "--batch max needs a CUDA device"),
        (["--batch", "lots"], "--batch takes"),
        (["--new-tokens", "1"], "--new-tokens must be at least 2"),
        (["--prompt-len", "20"], "does not fit under --budget"),
        (["--kernel", "flash"], "flash"),
    ],
)
def test_bench_bad_input_is_one_line(tiny_shape, capsys, args, message):
    argv = ["bench", "--shape", tiny_shape, *TINY_ARGS, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dynts: error:") and message in err
