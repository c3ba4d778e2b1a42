"""Module boundaries, read from the source: no import cycle among bitnet_fast modules (function-level imports
count: a cycle hidden inside a function is still a cycle), and the kernels layer imports nothing from the rest."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"bitnet_fast": ROOT / "bitnet_fast", "bitnet_fast.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (kernels/ is installed as bitnet_fast.kernels)."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            mods[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The bitnet_fast modules that `name` imports anywhere in its body (`from pkg import submodule` resolved)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_graph_is_read_correctly():
    g = _graph()
    assert "bitnet_fast.checkpoint" in g["bitnet_fast.train"] and "bitnet_fast.checkpoint" in g["bitnet_fast.evaluate"]
    assert "bitnet_fast.kernels.tuning" in g["bitnet_fast.kernels.cpu"]
    assert "bitnet_fast.plumbing" in g["bitnet_fast.export"]


def test_no_import_cycles():
    g = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path[path.index(n):], n])
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_kernels_import_nothing_from_the_rest_of_the_package():
    for name, deps in _graph().items():
        if name.startswith("bitnet_fast.kernels"):
            outside = {d for d in deps if not d.startswith("bitnet_fast.kernels")}
            assert not outside, f"{name} imports {sorted(outside)}: kernels/ must stay usable on its own"


def test_nothing_compiles_at_import():
    """Importing every module (a fresh process, Numba's on-disk cache warm or cold) leaves every Numba dispatcher
    without a compiled or cache-loaded signature: compilation happens on first call only (README's claim)."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import importlib, json, sys\n"
        "from numba.core.dispatcher import Dispatcher\n"
        f"for m in {sorted(_modules())!r}:\n"
        "    importlib.import_module(m)\n"
        "found = {f'{name}.{attr}': len(v.overloads) for name, mod in list(sys.modules.items())\n"
        "         if name.startswith('bitnet_fast') for attr, v in vars(mod).items() if isinstance(v, Dispatcher)}\n"
        "print(json.dumps(found))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(found) >= 20, found  # the scan sees the kernels (else it would pass vacuously)
    compiled = {name: n for name, n in found.items() if n}
    assert not compiled, f"compiled at import: {compiled}"
