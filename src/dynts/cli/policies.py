"""`dynts policies`: every registered policy, what a compression keeps, and its options with their defaults."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "policies",
        help="list the eviction policies, what each keeps, and their options",
        description="Every policy with one line on what a compression keeps and its options "
        "(set with --policy-opt KEY=VALUE, or NAME:KEY=VALUE in --policies).",
    )
    p.set_defaults(func=cmd_policies)


def cmd_policies(args) -> int:
    print(format_policies())
    return 0


def format_policies() -> str:
    from dynts.policies import POLICIES
    from dynts.policies.options import describe, format_spec

    lines = []
    for name, (cls, preset) in POLICIES.items():
        base = next(n for n, (c, p) in POLICIES.items() if c is cls and not p)
        if preset:
            lines.append(f"{name}\n    = {format_spec(base, preset)}")
            continue
        flags = [
            ("per layer and KV head" if cls.per_head else None),
            ("needs an importance head" if cls.uses_head else None),
            ("never compresses" if not cls.compresses else None),
        ]
        lines.append(
            f"{name}\n    keeps: {cls.summary}" + "".join(f"; {f}" for f in flags if f and f not in cls.summary)
        )
        options = describe(cls.Config)
        for option, kind, default, help_text in options:
            lines.append(f"    {option}={_show(default)}  ({kind}) {help_text}")
        if not options:
            lines.append("    (no options)")
    return "\n".join(lines)


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
