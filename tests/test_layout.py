"""The package's layering, read from the source (AST, nothing imported): every module imports only from its own
layer or the layers below it, and no two modules import each other in a cycle.

Layers, top to bottom: cli -> experiments -> predictor -> harness -> serving -> runtime -> api -> fast -> engine
-> policies -> kv -> models -> the base modules (config, errors). The predictor reads the result store of the
harness (collected traces), so it sits above it; the HTTP server (serving) drives the engine core and reads only
the runtime's engine spec. The package root is lazy and may be imported from anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "dynts"
RANK = {
    "config": 0,
    "errors": 0,
    "models": 1,
    "kv": 2,
    "policies": 3,
    "engine": 4,
    "fast": 5,
    "api": 6,
    "runtime": 7,
    "serving": 8,
    "harness": 9,
    "predictor": 10,
    "experiments": 11,
    "cli": 12,
    "__main__": 13,
    "__init__": 13,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(("dynts",) + parts)] = path
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, module: str, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported dynts module) for every import of a dynts module (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dynts"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "dynts":
                continue
            names = modules()
            for alias in node.names:  # `from dynts.fast import triton_decode` imports a module
                candidate = f"{base}.{alias.name}"
                out.append((node.lineno, candidate if candidate in names else base))
    return out


def test_layers_cover_every_module():
    assert {layer(m) for m in modules()} <= set(RANK), "a new top-level module or folder needs a layer here"


def test_no_module_imports_from_a_layer_above_its_own():
    violations = []
    for module, path in modules().items():
        mine = RANK[layer(module)]
        for line, target in imports(path, module):
            if target == "dynts":  # the root is lazy (its __version__ is all anyone takes from it)
                continue
            if RANK[layer(target)] > mine:
                violations.append(
                    f"{path.relative_to(PACKAGE)}:{line} ({layer(module)}) imports {target} ({layer(target)})"
                )
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_no_import_cycles():
    """Module-level imports (what runs at import time) form no cycle."""
    graph = {
        m: {t for _, t in imports(p, m, top_level_only=True) if t in modules() and t != m} for m, p in modules().items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_the_checker_sees_a_violation(tmp_path):
    """The rule is checked, not hoped for: a policy importing the harness is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from dynts.harness.store import ResultStore\n")
    found = imports(bad, "dynts.policies.bad")
    assert found and RANK[layer(found[0][1])] > RANK["policies"]


def test_python_dash_m_dynts_runs():
    proc = subprocess.run([sys.executable, "-m", "dynts", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("generate", "serve", "eval", "fidelity", "sweep", "bench", "policies"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    "folder",
    ["models", "kv", "policies", "engine", "fast", "runtime", "serving", "harness", "predictor", "experiments", "cli"],
)
def test_every_folder_is_a_documented_package(folder):
    init = PACKAGE / folder / "__init__.py"
    assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{folder}/__init__.py says what it holds"
