"""Policy registry: a name maps to a Policy class and the preset options it runs with.

Adding a policy: write one file with a Policy subclass (its `Config` dataclass holds its options), add one line
to POLICY_TABLE; `dynts policies` then lists it with its options.

The table names each class by module, and a class is imported when it is first looked up: the CLI parser reads
the policy names without importing torch (`dynts --help` stays fast).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from dynts.config import BudgetConfig
from dynts.errors import DynTSError
from dynts.policies.options import as_dict, build_config, describe, parse_spec

if TYPE_CHECKING:
    from dynts.policies.base import Policy

# name: ("module:Class" under dynts.policies, the preset options it runs with)
POLICY_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full:FullPolicy", {}),
    "window": ("window:WindowPolicy", {}),
    "streaming": ("streaming:StreamingPolicy", {}),
    "sepllm": ("sepllm:SepLLMPolicy", {}),
    "h2o": ("h2o:H2OPolicy", {}),
    "snapkv": ("snapkv:SnapKVPolicy", {}),
    "rkv": ("rkv:RKVPolicy", {}),
    "dynts": ("dynts:DynTSPolicy", {}),
    "dynts-random": ("dynts:DynTSPolicy", {"selection": "random"}),
    "dynts-bottom": ("dynts:DynTSPolicy", {"selection": "bottom"}),
    "dynts-noquestion": ("dynts:DynTSPolicy", {"protect_prompt": False}),  # the prompt scored 0
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICY_TABLE)


class _Registry(Mapping):
    """name -> (Policy class, preset), importing each class's module on first use."""

    def __getitem__(self, name: str) -> tuple[type[Policy], dict[str, Any]]:
        where, preset = POLICY_TABLE[name]
        module, cls = where.split(":")
        return getattr(importlib.import_module(f"dynts.policies.{module}"), cls), preset

    def __iter__(self) -> Iterator[str]:
        return iter(POLICY_TABLE)

    def __len__(self) -> int:
        return len(POLICY_TABLE)


POLICIES: Mapping[str, tuple[type[Policy], dict[str, Any]]] = _Registry()


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise DynTSError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name][0]


def policy_config(name: str, options: Mapping[str, Any] | None = None):
    """The config policy `name` runs with: its class defaults, then its preset, then `options` (text values are
    converted; an unknown option or a bad value raises a DynTSError naming the valid options)."""
    cls = policy_class(name)
    return build_config(name, cls.Config, POLICIES[name][1], options or {})


def make_policy(name: str, budget: BudgetConfig, options: Mapping[str, Any] | None = None, **context) -> Policy:
    """Build a policy; context (head, head_path, seed) reaches the policies that use it."""
    return policy_class(name).create(budget, policy_config(name, options), **context)


def budget_for(name: str, budget: int | None, window: int = 0, ratio: float = 1.0) -> BudgetConfig:
    """The B / W / r frame policy `name` runs under: no budget for a policy that never compresses."""
    cls = policy_class(name)
    if not cls.compresses or budget is None:
        return BudgetConfig(None)
    return BudgetConfig(budget, window, ratio, allow_zero_window=cls.allows_zero_window)


def resolve_spec(text: str, common: Mapping[str, Any] | None = None) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """A policy as written in a list of policies (NAME or NAME:KEY=VALUE...), plus the common options (--policy-opt)
    its policy has -> (name, the options that differ from its defaults, sorted). Unknown options and bad values
    raise a DynTSError naming the valid ones."""
    name, given = parse_spec(text)
    known = option_names(name)
    config = policy_config(name, {**{k: v for k, v in (common or {}).items() if k in known}, **given})
    default = as_dict(policy_config(name))
    return name, tuple(sorted((k, v) for k, v in as_dict(config).items() if default[k] != v))


def check_common_options(common: Mapping[str, Any], names: list[str]) -> None:
    """Options given for a list of policies must belong to at least one of them."""
    unused = [k for k in common if not any(k in option_names(name) for name in names)]
    if unused:
        raise DynTSError(
            f"--policy-opt {', '.join(unused)}: no policy of {', '.join(dict.fromkeys(names))} has "
            "such an option (see dynts policies)"
        )


def option_names(name: str) -> set[str]:
    return {field for field, *_ in describe(policy_class(name).Config)}
