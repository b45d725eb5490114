"""The package's import graph has no cycle: every ``import`` of a fastmmt module, at module level or
inside a function, read from the source with ``ast``. An edge from a module to one of its own parent
packages is not counted (Python runs a package's ``__init__`` before its modules anyway); an edge
to a package's ``__init__`` from outside it is."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "fastmmt").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    for path in (ROOT / "kernels").rglob("*.py"):  # installed as fastmmt.kernels
        parts = ["fastmmt", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts]
        mods[".".join(p for p in parts if p != "__init__")] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                if not t.startswith("fastmmt"):
                    continue
                dep = _resolve(t, mods)
                if dep and dep != mod and not mod.startswith(dep + "."):
                    graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_fastmmt_has_no_import_cycle():
    graph = import_graph()
    assert "fastmmt.train.runtime" in graph and "fastmmt.ops.triton_ops" in graph  # the walk saw the package
    assert "fastmmt.train.options" in graph["fastmmt.train.runtime"]  # and its edges
    assert cycles(graph) == []


def test_layers_import_in_one_direction():
    """ops imports nothing else of fastmmt; models no data or trainers; cluster and evaluation no
    trainers; only the CLI reads config files (imports the config loader)."""
    graph = import_graph()

    def deps(prefix: str) -> set[str]:
        return {d for m, ds in graph.items() if m == prefix or m.startswith(prefix + ".") for d in ds}

    assert all(d.startswith(("fastmmt.ops", "fastmmt.kernels")) for d in deps("fastmmt.ops")), deps("fastmmt.ops")
    assert not {d for d in deps("fastmmt.models") if d.startswith(("fastmmt.data", "fastmmt.train"))}
    for layer in ("fastmmt.cluster", "fastmmt.evaluation"):
        assert not {d for d in deps(layer) if d.startswith("fastmmt.train")}, layer
    readers = {m for m, ds in graph.items() if "fastmmt.cli.config" in ds}
    assert all(m.startswith(("fastmmt.cli", "fastmmt.tools")) for m in readers), readers
