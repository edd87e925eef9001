"""Packed projections (fast/packed_linear.py): the same products as F.linear, the same runs as the plain weights,
on by default where they run and off where they cannot."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dynts.errors import DynTSError
from dynts.experiments.op_count import OpCounter
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.fast.packed_linear import PLAIN_ROWS, PackedWeight, memory_problem, packing_problem, project
from test_compiled_step import GREEDY
from test_fast_engine import PROMPTS, assert_same_run, budget_for, pair

pytestmark = pytest.mark.skipif(
    packing_problem(torch.device("cpu"), torch.float32) is not None, reason="no oneDNN packed linear here"
)


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_packed_weight_equals_f_linear_at_any_row_count(rows):
    """Packed for 8 rows, it computes x W^T + b for any row count and leading shape (the prefill's, a release's)."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen)
    bias = torch.randn(96, generator=gen)
    x = torch.randn(rows, 1, 64, generator=gen)
    packed = PackedWeight(weight, 8)
    assert packed.nbytes == weight.numel() * 4
    torch.testing.assert_close(project(x, packed, bias), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(project(x, weight, None), F.linear(x, weight), atol=0, rtol=0)


def test_packed_weight_takes_the_plain_product_at_few_rows():
    """At PLAIN_ROWS rows or fewer (a batch's tail, one sequence left) the product runs on the plain weight, which
    streams faster there; above, on the packed one. Both equal F.linear."""
    weight, bias = torch.randn(96, 64), torch.randn(96)
    packed = PackedWeight(weight, 8)
    assert packed.plain.data_ptr() == weight.data_ptr()  # a reference to the model's weight, not a copy
    for rows in (1, PLAIN_ROWS, PLAIN_ROWS + 1, 8):
        x = torch.randn(rows, 1, 64)
        with OpCounter() as counter:
            packed(x, bias)
        assert ("mkldnn._linear_pointwise" in counter.ops) == (rows > PLAIN_ROWS), (rows, counter.ops)
        torch.testing.assert_close(packed(x, bias), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["full", "snapkv", "dynts"])
def test_packed_engine_equals_plain_weights(make_tiny, name):
    """Greedy tokens, statistics and the cache of the fused step on packed weights equal those on the plain
    weights (llama; the packed copies hold every projection's and the LM head's weights)."""
    lm = make_tiny("llama")
    _, plain = pair(lm, name, GREEDY, fast=FastConfig(fused=True, packed=False))
    _, packed = pair(lm, name, GREEDY, fast=FastConfig(fused=True, packed=True))
    a, b = plain.generate(PROMPTS), packed.generate(PROMPTS)
    assert packed.last_profile.packed and not plain.last_profile.packed
    assert_same_run(a, b)
    model = lm.model
    decode_weights = [p for n, p in model.named_parameters() if "proj" in n] + [model.get_output_embeddings().weight]
    assert packed.packed_bytes == sum(p.numel() * p.element_size() for p in decode_weights)
    assert plain.packed_bytes == 0


def test_packing_is_the_cpu_default_and_off_where_it_cannot_run(make_tiny, monkeypatch):
    """On by default on a CPU (compiled too: the whole forward is one graph then); off when DYNTS_PACKED=0; asked
    for where it cannot run, one clear error."""
    lm = make_tiny("llama")
    cpu = torch.device("cpu")
    assert FastConfig().for_device(cpu, torch.float32).packed is True
    assert FastConfig(compile=True).for_device(cpu, torch.float32).packed is True
    assert FastEngine(lm, "full", None, GREEDY, 2).fast.packed is True
    monkeypatch.setenv("DYNTS_PACKED", "0")
    assert FastConfig.from_environment().for_device(cpu, torch.float32).packed is False
    monkeypatch.setenv("DYNTS_PACKED", "maybe")
    with pytest.raises(DynTSError, match="DYNTS_PACKED must be 0 or 1"):
        FastConfig.from_environment()
    with pytest.raises(DynTSError, match="packed projections cannot run: .*fp32 or bf16"):
        FastConfig(packed=True).for_device(cpu, torch.float16)
    assert "fp32 or bf16" in packing_problem(cpu, torch.float16)
    assert "CPU" in packing_problem(torch.device("meta"), torch.float32)


def test_budgeted_packed_engine_matches_the_eager_engine(make_tiny):
    """The whole path against the eager engine (not only against the plain weights): a compressing policy's tokens
    and statistics on qwen2 (biased QKV: the packed product adds the bias)."""
    lm = make_tiny("qwen2")
    eager, fast = pair(lm, "window", GREEDY, budget=budget_for("window"), fast=FastConfig(packed=True))
    assert_same_run(eager.generate(PROMPTS), fast.generate(PROMPTS))
    assert fast.last_profile.packed


def test_no_packed_copy_by_default_where_it_would_crowd_the_memory():
    """A model whose weights are a third of the free memory gets no packed copy by default (it would hold them
    twice); a small one does."""
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    big = torch.nn.Linear(1024, free // 3 // (1024 * 4), bias=False, device="meta")  # meta: no memory taken
    assert "quarter of the free memory" in memory_problem(big)
    assert memory_problem(torch.nn.Linear(64, 64)) is None


@pytest.mark.parametrize("name", ["full", "snapkv"])
def test_long_prompts_on_the_cpu_default_path(make_tiny, name):
    """Prompts of 150-300 tokens (the tests' others hold about 10) through the CPU default (packed weights, live
    window): the eager engine's tokens and statistics, full cache and a budget that compresses after them."""
    lm = make_tiny("llama")
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (300, 150, 220)]
    budget = budget_for(name, budget=340, window=16) if name != "full" else None
    eager, fast = pair(lm, name, GREEDY, budget=budget, fast=FastConfig())
    assert_same_run(eager.generate(prompts), fast.generate(prompts))
    assert fast.last_profile.packed
