"""Import an importance predictor trained by the method's reference pipeline into our head format.

The reference training code (Robin930/DynTS) keeps its predictor as a module `is_head` inside the causal LM
and saves the whole model with transformers' `save_pretrained`: a model directory with config.json and
safetensors shards plus `model.safetensors.index.json` (or one `model.safetensors`). Its regression predictor
is an `nn.Sequential` of bias-free Linear layers, each followed by a Softplus:

    is_head.0 Linear(hidden -> h1) . is_head.1 Softplus . is_head.2 Linear(h1 -> h2) . is_head.3 Softplus
    . is_head.4 Linear(h2 -> 1) . is_head.5 Softplus

so its tensors are `is_head.0.weight`, `is_head.2.weight`, `is_head.4.weight` (Softplus holds none). That is
exactly our ImportanceHead (Linear -> Softplus per layer, no biases, a Softplus after the last Linear too), so
the import copies the weights in layer order and the imported head computes the same function. The reference's
classification variant (two outputs, no final Softplus) ranks tokens differently and is refused, as are
biases, unknown tensors under `is_head`, shapes that do not chain, and a shard that cannot be read: all before
anything is written.

The head records the base model's hidden size (config.json's, which must equal the first layer's input width;
the width alone when there is no config) and the base model's name (given, else config.json's `_name_or_path`,
else the checkpoint directory's name).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dynts.errors import DynTSError
from dynts.models.importance_head import HeadConfig, ImportanceHead

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODULE = "is_head"
_TENSOR = re.compile(r"^(?P<prefix>(?:.*\.)?)is_head\.(?P<rest>.+)$")
_LINEAR_WEIGHT = re.compile(r"^(?P<index>\d+)\.weight$")


@dataclass
class ImportedHead:
    """The head built from a checkpoint, and where its weights came from."""

    head: ImportanceHead
    tensors: dict[str, str]  # checkpoint tensor name -> the file it was read from


def import_reference_head(checkpoint_dir: str | Path, base_model: str | None = None) -> ImportedHead:
    """Read the reference pipeline's `is_head` predictor from a model checkpoint directory (nothing is written)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise DynTSError(f"{directory} is not a directory (expected a transformers model checkpoint)")
    locations = _predictor_tensors(directory)
    weights = [(name, _read_tensor(directory / file, name)) for name, file in locations.items()]
    widths = _check_chain(directory, weights)
    config_json = _read_config(directory)
    hidden_size = _hidden_size(directory, config_json, widths[0])
    name = base_model or str(config_json.get("_name_or_path") or "") or directory.resolve().name
    config = HeadConfig(
        hidden_size=hidden_size,
        layers=tuple(widths[1:-1]),
        base_model=name,
        training={
            "imported_from": str(directory.resolve()),
            "source": "reference pipeline: is_head (bias-free Linear -> Softplus layers) inside the model",
            "tensors": [tensor for tensor, _ in weights],
            "checkpoint_dtype": str(weights[0][1].dtype).replace("torch.", ""),
            "architectures": config_json.get("architectures"),
        },
    )
    head = ImportanceHead(config)
    linears = [module for module in head.net if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        for module, (_, weight) in zip(linears, weights):
            module.weight.copy_(weight.to(torch.float32))
    return ImportedHead(head.eval(), dict(locations))


def save_imported_head(imported: ImportedHead, out_dir: str | Path) -> Path:
    """Write the head in our format; refuses a directory that already holds files."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DynTSError(f"--out {out} already exists and is not an empty directory; choose a new one")
    return imported.head.save(out)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _predictor_tensors(directory: Path) -> dict[str, str]:
    """`is_head` tensor name -> file, in layer order, from the shard index or the single weights file."""
    index_path, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise DynTSError(f"{index_path} is not a safetensors index ({exc})") from None
        names = {str(k): str(v) for k, v in weight_map.items()}
    elif single.is_file():
        names = {name: SINGLE_FILE for name in _keys(single)}
    else:
        raise DynTSError(
            f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}: not a safetensors model checkpoint"
        )
    found = {name: file for name, file in names.items() if _TENSOR.match(name)}
    if not found:
        raise DynTSError(
            f"{directory} holds no importance predictor: no '{MODULE}.*' tensors among its {len(names)} weights "
            "(expected the reference pipeline's is_head.0.weight, is_head.2.weight, is_head.4.weight)"
        )
    prefixes = {_TENSOR.match(name)["prefix"] for name in found}
    if len(prefixes) > 1:
        raise DynTSError(f"{directory} holds more than one '{MODULE}' module: {', '.join(sorted(found))}")
    layers, unexpected = {}, []
    for name in found:
        match = _LINEAR_WEIGHT.match(_TENSOR.match(name)["rest"])
        if match is None:
            unexpected.append(name)
        else:
            layers[int(match["index"])] = name
    if unexpected:
        biases = [n for n in unexpected if n.endswith(".bias")]
        why = "the reference predictor (and our head) is bias-free" if biases else "not a Linear weight"
        raise DynTSError(
            f"{directory}: unexpected predictor tensor(s) {', '.join(sorted(unexpected))} ({why}); "
            "expected bias-free Linear layers only"
        )
    indices = sorted(layers)
    if indices != list(range(0, 2 * len(indices), 2)):
        raise DynTSError(
            f"{directory}: the predictor's Linear layers sit at positions {indices} of {MODULE}, not 0, 2, 4, ...: "
            "not the reference layout of Linear layers each followed by a Softplus"
        )
    return {layers[i]: found[layers[i]] for i in indices}


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types and OSError for unreadable files
        raise DynTSError(f"cannot read {path}: {_first_line(exc)}") from None


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    if not path.is_file():
        raise DynTSError(f"the checkpoint's index puts {name} in {path.name}, which is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    except Exception as exc:  # a truncated or corrupt shard, or the index names a tensor the shard lacks
        raise DynTSError(f"cannot read {name} from {path}: {_first_line(exc)}") from None


def _check_chain(directory: Path, weights: list[tuple[str, torch.Tensor]]) -> list[int]:
    """The widths hidden -> ... -> 1 of Linear weights [out, in] that chain; else one clear error."""
    for name, weight in weights:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise DynTSError(f"{directory}: {name} is not a 2-D float Linear weight (shape {tuple(weight.shape)})")
    widths = [int(weights[0][1].shape[1])]
    for (previous, _), (name, weight) in zip([(None, None), *weights[:-1]], weights):
        fan_out, fan_in = (int(x) for x in weight.shape)
        if fan_in != widths[-1]:
            raise DynTSError(
                f"{directory}: the predictor's shapes do not chain: {name} takes {fan_in} inputs but "
                f"{previous} gives {widths[-1]}"
            )
        widths.append(fan_out)
    if widths[-1] != 1:
        raise DynTSError(
            f"{directory}: the predictor ends in {widths[-1]} outputs; only the one-score (regression) predictor "
            "can be imported, not the reference's two-class classification variant"
        )
    return widths


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DynTSError(f"{path} is not valid JSON ({exc})") from None
    return config if isinstance(config, dict) else {}


def _hidden_size(directory: Path, config: dict, first_width: int) -> int:
    """config.json's hidden size (also under text_config), which must be the first layer's input width."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    declared = config.get("hidden_size", text.get("hidden_size"))
    if declared is None:
        return first_width
    if declared != first_width:
        raise DynTSError(
            f"{directory}: config.json gives hidden size {declared}, but the predictor's first layer takes "
            f"{first_width} inputs: the shapes do not chain with the base model"
        )
    return int(declared)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["ImportedHead", "import_reference_head", "save_imported_head"]
