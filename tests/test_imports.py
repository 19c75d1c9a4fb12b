"""The package's shape: no import cycle anywhere in maxlm/ (imports inside functions count), dependencies pointing
one way, the config schema importing nothing from maxlm, registries agreeing with the schema's names, and the
light commands (`maxlm config`, `maxlm plan`) starting without jax."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "maxlm")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                out[_module_name(os.path.join(root, f))] = os.path.join(root, f)
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The maxlm module an imported dotted name refers to (a module, or a name inside one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the maxlm modules it imports, at any depth of its code (top level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
            for n in names:
                if n == "maxlm" or n.startswith("maxlm."):
                    target = _resolve(n)
                    if target and target != mod:
                        deps.add(target)
        graph[mod] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def _in(mod: str, *packages: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


# Layers, lowest first: a module may import its own layer and those below it. Libraries beneath the cli (data,
# convert, plan) sit above the layers they need; nothing below reaches up to them except where listed.
LAYERS = [
    ("maxlm", "maxlm.config"),
    ("maxlm.mesh", "maxlm.flops", "maxlm.checkpoint_format", "maxlm.treepath"),
    ("maxlm.model",),
    ("maxlm.convert", "maxlm.data", "maxlm.plan"),
    ("maxlm.train",),
]


def _layer(mod: str) -> int:
    for i, packages in enumerate(LAYERS):
        if mod == "maxlm" and "maxlm" in packages:
            return i
        if any(_in(mod, p) for p in packages if p != "maxlm"):
            return i
    return len(LAYERS)  # cli, bench, demo, generate, distributed, ...: the top


def test_dependencies_point_one_way() -> None:
    """config -> mesh -> model -> (convert, data, plan) -> train -> cli: nothing imports a layer above its own."""
    bad = [(m, d) for m, deps in import_graph().items() for d in deps if _layer(d) > _layer(m)]
    assert bad == []


def test_config_schema_imports_nothing_from_maxlm() -> None:
    graph = import_graph()
    assert graph["maxlm.config.schema"] == set()
    leaks = {m: {d for d in deps if not _in(d, "maxlm.config")} for m, deps in graph.items() if _in(m, "maxlm.config")}
    assert {m: d for m, d in leaks.items() if d} == {}


def test_conversion_never_imports_training() -> None:
    graph = import_graph()
    assert {m: [d for d in deps if _in(d, "maxlm.train")] for m, deps in graph.items()
            if _in(m, "maxlm.convert") and any(_in(d, "maxlm.train") for d in deps)} == {}


def test_registries_match_the_schema_names() -> None:
    from maxlm.config import FFN_NAMES, OBJECTIVE_NAMES, REMAT_NAMES
    from maxlm.data.pipeline import BATCH_KEYS
    from maxlm.model.ffn import FFN_BLOCKS
    from maxlm.model.remat import REMAT_POLICIES
    from maxlm.train.batch import LmBatch
    from maxlm.train.objectives import OBJECTIVES

    assert set(FFN_BLOCKS) == set(FFN_NAMES)
    assert set(OBJECTIVES) == set(OBJECTIVE_NAMES) and all(o.name == k for k, o in OBJECTIVES.items())
    assert set(REMAT_POLICIES) == set(REMAT_NAMES)
    assert set(LmBatch.FIELDS) == set(BATCH_KEYS)


@pytest.mark.parametrize("argv", [["config", "tiny"],
                                  ["plan", "--compute", "1e20", "--hardware", "h100", "--chips", "8"]])
def test_light_commands_do_not_import_jax(argv: list[str]) -> None:
    code = ("import sys; from maxlm.cli import main; rc = main(%r); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax', 'orbax', 'grain'));"
            "print('HEAVY', heavy); sys.exit(rc)") % (argv,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
