"""The importance head: an MLP from the model's last hidden state to a non-negative importance score.

Saved as `head.safetensors` + `head.json` in one directory (or given as either file's path). The JSON records
the base model, sizes, the label transform and training metrics, so a checkpoint says what it is for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynts.errors import DynTSError

WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"


@dataclass
class HeadConfig:
    """hidden_size: the base model's hidden size; layers: widths of the hidden layers (paper: 8192, 2048)."""

    hidden_size: int
    layers: tuple[int, ...] = (8192, 2048)
    base_model: str = ""
    label_transform: str = "scale:10000"
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layers = tuple(int(x) for x in self.layers)
        if self.hidden_size <= 0 or any(x <= 0 for x in self.layers):
            raise DynTSError(f"head sizes must be positive, got hidden_size={self.hidden_size} layers={self.layers}")


class ImportanceHead(nn.Module):
    """Linear -> Softplus stacks without biases, ending in one Softplus-activated score (docs/algorithm.md)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        widths = (config.hidden_size, *config.layers, 1)
        blocks: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(fan_in, fan_out, bias=False), nn.Softplus()]
        self.net = nn.Sequential(*blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size] -> scores [...]."""
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, path: str | Path, expected_hidden_size: int | None = None, map_location="cpu") -> ImportanceHead:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(path)
        if directory.is_file():
            directory = directory.parent
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise DynTSError(f"no importance head at {path}: expected {CONFIG_FILE} and {WEIGHTS_FILE} in {directory}")
        try:
            raw = json.loads(config_path.read_text())
            config = HeadConfig(**raw)
        except (ValueError, TypeError) as exc:
            raise DynTSError(f"importance head config {config_path} is unreadable: {exc}") from None
        if expected_hidden_size is not None and config.hidden_size != expected_hidden_size:
            raise DynTSError(
                f"importance head {directory} was trained for hidden size {config.hidden_size} "
                f"(base model {config.base_model or 'unknown'}), but this model's hidden size is {expected_hidden_size}"
            )
        head = cls(config)
        try:
            state = load_file(str(weights_path), device=str(map_location))
            head.load_state_dict(state)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise DynTSError(
                f"importance head weights {weights_path} are corrupt or do not match {config_path}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        return head.eval()


def head_digest(head: ImportanceHead) -> str:
    """A short digest of the head's weights: runs that record it never mix two heads' results on resume."""
    data = b"".join(p.detach().cpu().numpy().tobytes() for p in head.parameters())
    return hashlib.sha256(data).hexdigest()[:16]


def random_head(hidden_size: int, layers=(64, 16), seed: int = 0, base_model: str = "") -> ImportanceHead:
    """A head with fixed random weights: a stand-in for tests and for models no head was trained for."""
    generator = torch.Generator().manual_seed(seed)
    head = ImportanceHead(HeadConfig(hidden_size=hidden_size, layers=tuple(layers), base_model=base_model))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
    return head.eval()


SHIPPED_HEADS_DIR = Path(__file__).parent / "heads"


def shipped_head_path(model_name: str) -> Path | None:
    """The head trained by us for a model, shipped inside the package, if there is one."""
    path = SHIPPED_HEADS_DIR / model_name.replace("/", "--")
    return path if (path / CONFIG_FILE).is_file() else None


def resolve_head(path: str | Path | None, loaded) -> ImportanceHead:
    """The head the dynts policy runs with: an explicit checkpoint, else the one shipped for the model."""
    if path is None:
        path = shipped_head_path(loaded.name)
        if path is None:
            raise DynTSError(
                f"policy dynts needs an importance head and none ships for model {loaded.name!r}: "
                "pass --head PATH (train one with `dynts collect`, `dynts label`, `dynts train`)"
            )
    return ImportanceHead.load(path, expected_hidden_size=loaded.hidden_size)
