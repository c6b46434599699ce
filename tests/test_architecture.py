"""The map matches the territory: every import in src/sdlora points down the layers that docs/architecture.md lists,
no module imports itself back through others, every module is named in the map, and long functions are justified.

The layer order is written once, in the ``layers`` block of docs/architecture.md; this test reads it from there.
Run as a script (``python tests/test_architecture.py``) it prints the import graph's summary.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "sdlora"
DOC = REPO / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 100


# --------------------------------------------------------------------------------------------- the code's graph
def module_name(path: Path, src: Path = SRC) -> str:
    """``src/sdlora/data/base.py`` -> ``sdlora.data.base``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The sdlora modules that ``path`` imports anywhere (module level, inside functions, under TYPE_CHECKING):
    ``from .x import y`` names ``x.y`` when that is a module, else ``x``."""
    known = set(known)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sdlora")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sdlora":
                continue
            found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names)
    found.discard(name)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    mods = modules(src)
    return {name: imported_modules(name, path, mods) for name, path in mods.items()}


def room(module: str) -> str:
    """The unit of the layer map: a top-level module or a whole package (``sdlora.data.base`` -> ``data``); the
    package root ``sdlora/__init__.py`` (which holds ``__version__``) is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


# ----------------------------------------------------------------------------------------------- the doc's map
def documented_layers(doc: Path = DOC) -> list[list[str]]:
    """The ``layers`` code block of docs/architecture.md, top layer first: one layer per line, rooms separated by
    commas, ``#`` starts a comment."""
    match = re.search(r"```layers\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert match, f"{doc}: no ```layers block (the layer order, top first)"
    layers = []
    for line in match.group(1).splitlines():
        names = [n.strip().removesuffix("/").removesuffix(".py") for n in line.split("#")[0].split(",")]
        if any(names):
            layers.append([n for n in names if n])
    return layers


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Imports of a room on the same or a higher layer (``level`` counts from the bottom), as readable lines."""
    level = {r: len(layers) - i for i, layer in enumerate(layers) for r in layer}
    bad = []
    for src_mod, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = room(src_mod), room(dst)
            if a != b and level.get(a, 0) <= level.get(b, 0):
                bad.append(f"{src_mod} (layer {level.get(a)}) imports {dst} (layer {level.get(b)})")
    return bad


def long_functions(src: Path = SRC, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(path::qualified name, lines)`` of every function or method longer than ``limit`` lines (def to last line,
    docstring included)."""
    out = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        todo: list[tuple[ast.AST, str]] = [(ast.parse(path.read_text(encoding="utf-8")), "")]
        while todo:
            node, prefix = todo.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    n = (child.end_lineno or child.lineno) - child.lineno + 1
                    if not isinstance(child, ast.ClassDef) and n > limit:
                        out.append((f"{rel}::{name}", n))
                    todo.append((child, name + "."))
    return sorted(out)


# ------------------------------------------------------------------------------------------------------- tests
def test_every_room_of_the_code_is_on_exactly_one_layer():
    layers = documented_layers()
    listed = [r for layer in layers for r in layer]
    rooms = {room(m) for m in modules()}
    assert sorted(r for r in set(listed) if listed.count(r) > 1) == [], "a room listed on two layers"
    assert sorted(rooms - set(listed)) == [], "modules or packages missing from the ```layers block"
    assert sorted(set(listed) - rooms) == [], "the ```layers block names something that is not in src/sdlora"


def test_imports_point_down_and_form_no_cycle():
    graph = import_graph()
    assert cycles(graph) == []
    assert upward_imports(graph, documented_layers()) == []


def test_every_module_is_named_in_the_architecture_doc():
    text = DOC.read_text(encoding="utf-8")
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if path.name == "__init__.py" and path.parent != SRC:
            rel = rel.removesuffix("__init__.py")  # a package is named as `data/`
        if rel != "__init__.py" and not re.search(rf"(?<![\w/.]){re.escape(rel)}(?!\w)", text):
            missing.append(rel)
    assert missing == [], f"name these in {DOC.name} (what each owns)"


def test_long_functions_are_justified_in_the_architecture_doc():
    text = DOC.read_text(encoding="utf-8")
    unexplained = [f"{name} ({n} lines)" for name, n in long_functions() if f"`{name}`" not in text]
    assert unexplained == [], f"split them, or say in {DOC.name} why they stay whole"


def test_the_checks_catch_what_they_name(tmp_path):
    """A cycle, an upward import, a long function: each is found in a made-up package."""
    pkg = tmp_path / "sdlora"
    (pkg / "inner").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n")  # lazy, still an import
    (pkg / "high.py").write_text("from . import low\n")
    (pkg / "inner" / "__init__.py").write_text("from .a import x\n")
    (pkg / "inner" / "a.py").write_text("from ..low import f\nfrom .b import y\n")
    (pkg / "inner" / "b.py").write_text("from .a import z\n" + "def long():\n" + "    pass\n" * MAX_FUNCTION_LINES)
    graph = import_graph(pkg)
    assert graph["sdlora.high"] == {"sdlora.low"}
    assert graph["sdlora.inner"] == {"sdlora.inner.a"}
    assert sorted(map(tuple, cycles(graph))) == [
        ("sdlora.high", "sdlora.low"),
        ("sdlora.inner.a", "sdlora.inner.b"),
    ]
    layers = [["high"], ["inner"], ["low"], ["__init__"]]
    assert upward_imports(graph, layers) == ["sdlora.low (layer 2) imports sdlora.high (layer 4)"]
    assert long_functions(pkg) == [("inner/b.py::long", MAX_FUNCTION_LINES + 1)]


if __name__ == "__main__":
    g = import_graph()
    rooms = {room(m) for m in g}
    arrows = {(room(a), room(b)) for a, targets in g.items() for b in targets if room(a) != room(b)}
    print(
        f"{len(g)} modules in {len(rooms)} rooms on {len(documented_layers())} layers; "
        f"{sum(map(len, g.values()))} module imports, {len(arrows)} arrows between rooms; "
        f"cycles: {len(cycles(g))}; upward imports: {len(upward_imports(g, documented_layers()))}"
    )
    for name, n in long_functions():
        print(f"function over {MAX_FUNCTION_LINES} lines: {name} ({n})")
    sys.exit(0)
