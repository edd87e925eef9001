"""Named model shapes for benchmarks: the real architectures' configs, built with random weights (no download).

`r1-qwen-7b` is the Qwen2 config of DeepSeek-R1-Distill-Qwen-7B, `r1-llama-8b` the Llama-3.1-8B config of
DeepSeek-R1-Distill-Llama-8B, `smollm2-135m` the embedded model. Any other name is a Hugging Face id or local
directory whose config is read with AutoConfig. Speed depends on the shape only, so random weights measure it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dynts.errors import DynTSError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelShape:
    """The numbers that fix a decoder's cost; `hub_id` is where the real weights live."""

    name: str
    model_type: str  # llama or qwen2
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    hub_id: str
    rope_scaling: dict | None = field(default=None, hash=False)

    def __post_init__(self):
        if self.model_type not in ("llama", "qwen2"):
            raise DynTSError(f"shape {self.name}: model_type must be llama or qwen2, got {self.model_type}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise DynTSError(f"shape {self.name}: heads must divide hidden size and KV heads must divide heads")

    def config(self):
        from transformers import LlamaConfig, Qwen2Config

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            tie_word_embeddings=self.tie_word_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=rope,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        if self.model_type == "qwen2":
            return Qwen2Config(**common, use_sliding_window=False)
        return LlamaConfig(**common)


SHAPES: dict[str, ModelShape] = {
    "r1-qwen-7b": ModelShape(
        "r1-qwen-7b",
        "qwen2",
        3584,
        28,
        28,
        4,
        18944,
        152064,
        False,
        10000.0,
        1e-6,
        131072,
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    ),
    "r1-llama-8b": ModelShape(
        "r1-llama-8b",
        "llama",
        4096,
        32,
        32,
        8,
        14336,
        128256,
        False,
        500000.0,
        1e-5,
        131072,
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "smollm2-135m": ModelShape(
        "smollm2-135m", "llama", 576, 30, 9, 3, 1536, 49152, True, 100000.0, 1e-5, 8192, "smollm2-135m"
    ),
}


def shape_config(name: str):
    """A transformers config for a named shape, a local model directory or a Hugging Face id."""
    if name in SHAPES:
        return SHAPES[name].config()
    from transformers import AutoConfig

    local = Path(name).expanduser()
    if not local.is_dir() and name.count("/") != 1:
        raise DynTSError(
            f"unknown shape {name!r}: choose one of {', '.join(SHAPES)}, a model directory, "
            "or a Hugging Face id (owner/name)"
        )
    try:
        config = AutoConfig.from_pretrained(str(local) if local.is_dir() else name)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DynTSError(f"could not read the config of {name!r}: {first}") from None
    return config


class NullTokenizer:
    """Stands in for a tokenizer (random-weight models, tests): no EOS, no chat template, no text in, ids out."""

    eos_token_id = None
    chat_template = None

    def __len__(self):
        return 0

    def encode(self, text, add_special_tokens=True):
        return []  # text can't be tokenized: the engine then reports an empty prompt

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)

    def get_vocab(self):
        return {}


def random_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0):
    """The architecture of `name` with random weights, built directly on `device` in `dtype` (default fp32), ready
    for the engine. torch and transformers load here, not with the module: the parser reads SHAPES."""
    import torch
    from transformers import AutoModelForCausalLM

    from dynts.models.loading import SUPPORTED_TYPES, prepare_model

    dtype = torch.float32 if dtype is None else dtype

    config = shape_config(name)
    if getattr(config, "model_type", "?") not in SUPPORTED_TYPES:
        raise DynTSError(f"shape {name!r} is a {config.model_type!r} model; supported: {', '.join(SUPPORTED_TYPES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return prepare_model(model.to(dtype), NullTokenizer(), name, device)
