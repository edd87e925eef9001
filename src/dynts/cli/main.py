"""The `dynts` command line: the parser, and one module per command group (each has a `register`).

Every subcommand is a thin layer over the Python API. User mistakes (DynTSError) print one line
`dynts: error: ...` and exit with code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys

from dynts import __version__
from dynts.cli import bench, compare, evaluate, fidelity, generate, policies, predictor, serve, sweep
from dynts.errors import DynTSError


# --- parser ---------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """Usage mistakes read like every other user error: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"dynts: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dynts",
        description="Memory-bounded reasoning inference: budgeted KV "
        "cache decoding with DynTS and baseline eviction policies.",
    )
    parser.add_argument("--version", action="version", version=f"dynts {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in (generate, serve, evaluate, compare, predictor, fidelity, sweep, bench, policies):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DynTSError as exc:
        print(f"dynts: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynts: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
