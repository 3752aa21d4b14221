"""The package's shape: layers that only point down, no import cycles, no private names across
modules, and modules small enough to read. Read from the source (function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanostream"
# Lower numbers sit lower. A module may import its own layer and the ones below, never above.
LAYERS = {
    "paths": 0, "process": 0, "charts": 0, "access": 0, "__init__": 0,
    "store": 1,
    "engine": 2,
    "sources": 3,
    "flows": 4, "experiments": 4,
    "jobs": 5, "standby": 5, "worker": 5, "runners": 5,
    "api": 6, "cli": 6, "ui": 6, "__main__": 7,
}
# Same-rank packages that must not import each other (builds never import research).
APART = {("flows", "experiments"), ("experiments", "flows")}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("nanostream"):
                target = node.module.removeprefix("nanostream").lstrip(".")
            else:
                continue
            found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("nanostream").lstrip("."), []) for a in node.names
                      if a.name.startswith("nanostream")]
    return found


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The modules an import reaches: 'from pkg import mod' reaches pkg.mod."""
    reached = [target] if target in known or not target else []
    for n in names:
        sub = f"{target}.{n}" if target else n
        if sub in known:
            reached.append(sub)
    return [r for r in reached if r] or ([target] if target else [])


def layer(module: str) -> tuple[str, int]:
    top = module.split(".")[0] or "__init__"
    return top, LAYERS[top]


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        edges[name] = {r for target, names in imports_of(name, path) for r in resolve(target, names, known)
                       if r != name and r in known}
    return edges


def test_every_module_sits_in_a_known_layer():
    assert all(m.split(".")[0] in LAYERS for m in modules())


def test_layers_only_point_down():
    upward = []
    for module, targets in graph().items():
        (top, rank) = layer(module)
        for target in targets:
            (other, other_rank) = layer(target)
            if other_rank > rank or (top, other) in APART:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_cycles():
    edges, cycles, state = graph(), [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_module_takes_another_modules_private_names():
    known = modules()
    private = [f"{name} takes {target}.{n}" for name, path in known.items()
               for target, names in imports_of(name, path) for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_modules_are_small_enough_to_read():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_pages_are_thin():
    pages = Path(__file__).resolve().parent.parent / "pages"
    sizes = {p.name: len(p.read_text().splitlines()) for p in pages.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 120} == {}


def test_charts_draw_with_matplotlib_only():
    """charts sits in layer 0: data in, PNG bytes out, so every layer may draw. It imports no
    NanoStream module and, past the standard library, only matplotlib and numpy."""
    import sys

    path = PACKAGE / "charts.py"
    assert imports_of("charts", path) == []
    tree = ast.parse(path.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots - set(sys.stdlib_module_names) - {"__future__"} == {"matplotlib", "numpy"}
