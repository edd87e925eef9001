"""`dynts --help` and every subcommand's --help stay fast: building the parser imports neither torch nor
transformers (nor the other heavy libraries); a subcommand's modules load only when it runs."""

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "numpy", "matplotlib", "scipy", "math_verify", "ray", "fastapi")

PROBE = f"""
import contextlib, io, json, sys
from dynts.cli.main import build_parser

parser = build_parser()
loaded = {{"parser": [m for m in {HEAVY!r} if m in sys.modules]}}
commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
for argv in [["--help"]] + [[name, "--help"] for name in commands]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    assert "usage:" in out.getvalue(), argv
    loaded[" ".join(argv)] = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps(loaded))
"""


def test_help_imports_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert len(loaded) > 10  # the parser, dynts --help and every subcommand's --help
    assert {where: mods for where, mods in loaded.items() if mods} == {}


def test_probe_would_see_a_heavy_import():
    """The check is real: a module that imports torch shows up in sys.modules in the same kind of subprocess."""
    code = "import sys, dynts.policies; dynts.policies.POLICIES['h2o']; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
