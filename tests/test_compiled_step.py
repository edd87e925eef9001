"""The compiled decode step and the fused decoder against the eager step and the model's own forward (fp32, CPU).

Compiling is slow on a small CPU, so every compiled test uses the smallest tiny model and the same budget (so the
same capacity): dynamo keeps compiled graphs per code object, and parametrizations whose policies put the same ops
in the forward (no attention observer / recent queries / attention probabilities) reuse one graph.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from dynts.config import SamplingConfig
from dynts.engine.engine import Engine
from dynts.errors import DynTSError
from dynts.experiments.op_count import live_sequence
from dynts.fast.compiled_step import CompileConfig, compile_from_environment
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.fast.fused_decoder import FusedDecoder
from dynts.fast.profile import DecodeProfile
from dynts.models.importance_head import random_head
from test_fast_engine import ALL_FAST, PROMPTS, assert_same_cache, assert_same_run, budget_for, pair

GREEDY = SamplingConfig(greedy=True, max_new_tokens=45, ignore_eos=True)
# The full cache's capacity is the longest prompt + max_new_tokens + the fast path's slack (4 at check_every 1):
# 11 + 13 + 4 = 28, the budget of the other policies, so all of them compile at one shape.
GREEDY_FULL = dataclasses.replace(GREEDY, max_new_tokens=13)


def decode_step_outputs(lm, fused: bool):
    """Hidden states and logits of one static decode step after the prompts are prefilled (policy full)."""
    engine = FastEngine(lm, "full", None, GREEDY, 3, fast=FastConfig(fused=fused))
    engine.last_profile = DecodeProfile()
    stepper = engine.stepper(3, 64)
    try:
        for row, prompt in enumerate(PROMPTS):
            stepper.admit(row, live_sequence(engine, prompt, row, 10))
        with torch.no_grad():
            hidden, logits = stepper.static_step.forward()
        keys = [layer.keys.clone() for layer in stepper.cache.layers]
    finally:
        stepper.close()
    return hidden, logits, keys


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_decoder_equals_model_forward(make_tiny, kind):
    """Same hidden states, logits and written keys as the model's forward; the model itself is unchanged by the
    merged projections (its Linear modules hold views of the merged weights)."""
    lm = make_tiny(kind)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        before = lm.model(ids).logits
    hidden_a, logits_a, keys_a = decode_step_outputs(lm, fused=False)
    hidden_b, logits_b, keys_b = decode_step_outputs(lm, fused=True)
    torch.testing.assert_close(hidden_b, hidden_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-5, rtol=1e-5)
    for a, b in zip(keys_a, keys_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, before, atol=0, rtol=0)
    attn = lm.model.get_decoder().layers[0].self_attn
    fused = FusedDecoder(lm.model)  # building it again reuses the merged tensor
    assert fused.layers[0].qkv_weight.data_ptr() == attn.q_proj.weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4


@pytest.mark.parametrize("name", ["full", "snapkv", "h2o", "dynts"])
def test_fused_engine_matches_eager(make_tiny, name):
    """The fused decoder on the fast path: the eager engine's tokens, statistics and cache contents (qwen2: biased
    QKV; the observers of snapkv and h2o see the same queries and probabilities)."""
    lm = make_tiny("qwen2")
    eager, fast = pair(lm, name, GREEDY, fast=FastConfig(sync_check=True, fused=True))
    a, b = eager.generate(PROMPTS), fast.generate(PROMPTS)
    assert fast.last_profile.fused
    assert_same_run(a, b)
    assert_same_cache(eager.last_cache, fast.last_cache)


@pytest.mark.parametrize("name", ALL_FAST)
def test_compiled_step_matches_eager(make_tiny, name):
    """Greedy tokens, statistics and caches of the compiled step equal the eager engine's for every capturable
    policy; compile time is reported and a second run of the same shape compiles nothing."""
    lm = make_tiny("llama")
    sampling = GREEDY_FULL if name == "full" else GREEDY
    eager, fast = pair(lm, name, sampling, fast=FastConfig(compile=True, packed=False))  # regions: the GPU's way
    a, b = eager.generate(PROMPTS), fast.generate(PROMPTS)
    profile = fast.last_profile
    assert profile.compiled and profile.fused and profile.compiles == 2 and profile.compile_s > 0  # two regions
    assert fast.compile_failure.reason is None
    assert_same_run(a, b)
    assert_same_cache(eager.last_cache, fast.last_cache)
    again = fast.generate(PROMPTS)
    assert fast.last_profile.compiles == 0 and fast.last_profile.compile_s == 0
    assert [r.token_ids for r in again.results] == [r.token_ids for r in a.results]


def test_warm_up_compiles_before_the_run(make_tiny):
    """warm_up compiles the shapes a run will use, so the run itself compiles nothing."""
    lm = make_tiny("llama")
    engine = FastEngine(lm, "window", budget_for("window"), GREEDY, 3, fast=FastConfig(compile=True, packed=False))
    assert engine.warm_up([3], 28) >= 0
    assert engine.last_profile.compiles == 2  # the two layer regions, once for every layer
    out = engine.generate(PROMPTS)
    assert engine.last_profile.compiles == 0
    reference = Engine(lm, "window", budget_for("window"), GREEDY, 3).generate(PROMPTS)
    assert [r.token_ids for r in out.results] == [r.token_ids for r in reference.results]


@pytest.mark.parametrize("name", ["full", "snapkv", "dynts"])
def test_compiled_step_on_packed_weights_matches_eager(make_tiny, name):
    """The CPU's compiled step: the whole forward in one graph, its GEMMs oneDNN's packed products through the
    dynts::packed_linear op; the eager engine's tokens, statistics and caches, one compile per shape."""
    lm = make_tiny("llama")
    sampling = GREEDY_FULL if name == "full" else GREEDY
    eager, fast = pair(lm, name, sampling, fast=FastConfig(compile=True))
    assert fast.fast.packed
    a, b = eager.generate(PROMPTS), fast.generate(PROMPTS)
    profile = fast.last_profile
    assert profile.compiled and profile.packed and profile.compiles == 1 and fast.compile_failure.reason is None
    assert_same_run(a, b)
    assert_same_cache(eager.last_cache, fast.last_cache)
    assert fast.generate(PROMPTS).stats.generated_tokens == a.stats.generated_tokens
    assert fast.last_profile.compiles == 0


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler on this machine")


def test_compile_failure_falls_back_to_eager_with_one_warning(make_tiny):
    lm = make_tiny("llama")
    head = random_head(lm.hidden_size)
    budget = budget_for("dynts")
    fast = FastEngine(
        lm, "dynts", budget, GREEDY, 3, head=head, fast=FastConfig(compile=True, compile_backend=failing_backend)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fast.generate(PROMPTS)
        second = fast.generate(PROMPTS)
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0] and "eagerly" in messages[0]
    assert "no C++ compiler" in fast.compile_failure.reason
    assert not fast.last_profile.compiled
    reference = Engine(lm, "dynts", budget, GREEDY, 3, head=head).generate(PROMPTS)
    for out in (first, second):
        assert [r.token_ids for r in out.results] == [r.token_ids for r in reference.results]


def test_compile_switch_from_flags_and_environment(monkeypatch):
    monkeypatch.delenv("DYNTS_COMPILE", raising=False)
    assert compile_from_environment(None) is False
    monkeypatch.setenv("DYNTS_COMPILE", "1")
    assert compile_from_environment(None) is True and FastConfig.from_environment().compile
    assert compile_from_environment(False) is False  # a flag wins over the environment
    monkeypatch.setenv("DYNTS_COMPILE", "yes please")
    with pytest.raises(DynTSError, match="DYNTS_COMPILE must be 0 or 1"):
        FastConfig.from_environment()
    with pytest.raises(DynTSError, match="unknown compile mode"):
        CompileConfig(mode="fastest")


def test_compile_flag_reaches_the_engine_spec(monkeypatch):
    from dynts.cli.args import engine_spec_from_args
    from dynts.cli.main import build_parser

    monkeypatch.delenv("DYNTS_COMPILE", raising=False)
    for command in (["generate", "--prompt", "x"], ["eval", "--out", "o"]):
        args = build_parser().parse_args([*command, "--policy", "full", "--compile"])
        spec = engine_spec_from_args(args)
        assert spec.compile is True and FastConfig.from_environment(compile=spec.compile).compile
        args = build_parser().parse_args([*command, "--policy", "full"])
        spec = engine_spec_from_args(args)
        assert spec.compile is None and not FastConfig.from_environment(compile=spec.compile).compile
