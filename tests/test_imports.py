"""Imports flow one way (scenario → plan → engine/schemes → events → metrics → report; loaders import
models, never back): no module of spdsim/ or executor/ may reach itself through its imports. Read with
`ast` — lazy imports inside functions count too, since they hide a cycle rather than remove it."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("spdsim", "executor")


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> nx.DiGraph:
    """module → every project module it imports (by name, `from X import Y` counting X.Y when Y is a
    module). Importing a submodule is not counted as importing its package's __init__."""
    mods = _modules(root, packages)
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    g.add_edge(name, t)
    return g


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c + [c[0]]) for c in cycles[:10])


def test_layers_import_one_way():
    g = import_graph()
    reach = {m: nx.descendants(g, m) for m in g}
    # the engine's shared kernel and the schemes never reach the engine, the sweep or a report
    for low in ["spdsim.kernel", "spdsim.scenario", "spdsim.metrics", "spdsim.trace", "spdsim.costs"]:
        assert not reach[low] & {"spdsim.engine", "spdsim.sweep", "spdsim.report", "spdsim.plan"}, low
    assert "spdsim.calibrate" not in reach["spdsim.scenario"]
    assert "executor.hf_loader" not in reach["executor.model"]       # loaders import the model
    assert not any(m.startswith("executor") for m in set().union(*(reach[m] | {m} for m in g if m.startswith("spdsim"))))


def test_the_check_finds_a_lazy_cycle(tmp_path):
    """The check can fail: a package whose modules import each other, one of them lazily, is caught."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    cycles = [sorted(c) for c in nx.simple_cycles(import_graph(tmp_path, ("pkg",)))]
    assert cycles == [["pkg.a", "pkg.b"]]
