"""Shared fixtures: the embedded real model (loaded once per session) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread by default: the models here are small, and on a busy 2-core machine two OpenMP threads
# spin-wait for each other (measured: these tests took 30 min with 2 threads vs 5 min with 1 while other jobs
# ran). DYNTS_TEST_THREADS=N overrides.
TEST_THREADS = int(os.environ.get("DYNTS_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (fp32 on CPU), loaded once for the whole session."""
    from dynts.models.loading import load_model

    return load_model("smollm2-135m", device="cpu", dtype="fp32")


def tiny_model(kind: str = "llama", vocab_size: int = 128, seed: int = 0, name: str | None = None, tokenizer=None):
    """A tiny random causal LM (hidden 64, 2 layers, 4 heads, 2 KV heads) wrapped for the engine, without EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from dynts.models.loading import prepare_model
    from dynts.models.shapes import NullTokenizer

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config).float()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return prepare_model(model, tokenizer if tokenizer is not None else NullTokenizer(), name or f"tiny-{kind}")


@pytest.fixture(scope="session")
def make_tiny():
    """Factory for tiny random models: make_tiny(kind="llama", vocab_size=128, seed=0, name=None, tokenizer=None)."""
    return tiny_model
