"""Policy options: each policy's settings are a frozen config dataclass, settable by name from the CLI
(`--policy-opt KEY=VALUE`, or `NAME:KEY=VALUE` in a list of policies), the Python API (`policy_options={...}`) and
sweep grids. Values given as text are converted by the field's type; the dataclass checks its own values.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from dynts.errors import DynTSError

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The config of a policy without settings."""


def option_help(help_text: str, **kwargs) -> Any:
    """A config field with a one-line description, shown by `dynts policies`."""
    return dataclasses.field(metadata={"help": help_text}, **kwargs)


def describe(config_cls) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of every option."""
    hints = typing.get_type_hints(config_cls)
    return [
        (f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(config_cls)
    ]


def summary(config_cls) -> str:
    """'name (type, default D)' for every option, for error messages."""
    options = describe(config_cls)
    if not options:
        return "it has no options"
    return "its options: " + ", ".join(f"{name} ({kind}, default {default!r})" for name, kind, default, _ in options)


def build_config(policy: str, config_cls, *layers: Mapping[str, Any]):
    """The config of `policy` from option mappings applied in order (later wins); text values are converted."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in fields:
                raise DynTSError(f"policy {policy} has no option {key!r}; {summary(config_cls)}")
            values[key] = _convert(policy, key, value, hints[key], config_cls)
    try:
        return config_cls(**values)
    except DynTSError as exc:
        raise DynTSError(f"policy {policy}: {exc}; {summary(config_cls)}") from None


def as_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_assignments(texts: list[str] | None, flag: str = "--policy-opt") -> dict[str, str]:
    """['key=value', ...] -> {key: value}, in order (a later key wins)."""
    options: dict[str, str] = {}
    for text in texts or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise DynTSError(f"{flag} takes KEY=VALUE, got {text!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """'NAME' or 'NAME:KEY=VALUE:KEY=VALUE' -> (name, {key: value})."""
    name, *assignments = [part.strip() for part in text.split(":")]
    return name, parse_assignments(assignments, flag=f"policy {name!r}")


def format_spec(name: str, options: Mapping[str, Any]) -> str:
    """The inverse of parse_spec: 'NAME:KEY=VALUE...' (just NAME without options)."""
    return ":".join([name, *(f"{k}={_text(v)}" for k, v in options.items())])


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return " | ".join(_type_name(a) for a in args) + (" | None" if type(None) in typing.get_args(hint) else "")
    if typing.get_origin(hint) is typing.Literal:
        return "|".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _convert(policy: str, key: str, value: Any, hint, config_cls) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    optional = type(None) in typing.get_args(hint)
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if optional and text.lower() in ("none", "null", ""):
        return None
    for kind in kinds:
        try:
            if kind is bool:
                if text.lower() in _TRUE:
                    return True
                if text.lower() in _FALSE:
                    return False
                raise ValueError
            if kind in (int, float):
                return kind(text)
            if kind is str:
                return text
        except ValueError:
            continue
    raise DynTSError(f"policy {policy}: option {key} takes {_type_name(hint)}, got {value!r}; {summary(config_cls)}")
