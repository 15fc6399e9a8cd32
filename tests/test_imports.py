"""The package's layers: no import cycle inside pahq_fx, at module level or inside functions (imports under
``TYPE_CHECKING`` aside), found from the source with the standard library."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pahq_fx"


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imported(modules: dict[str, Path], current: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The pahq_fx modules an import statement names (a name imported from a package counts as its submodule when
    it is one, otherwise as the package)."""
    package = current if modules[current].name == "__init__.py" else current.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
        module = ".".join(base + ([node.module] if node.module else []))
        targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module for alias in node.names]
    out = []
    for target in targets:
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and target != current:
            out.append(target)
    return out


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        type_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        graph[name] = {
            target
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in type_only
            for target in _imported(modules, name, node)
        }
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read():
    graph = _import_graph()
    assert "pahq_fx.acdc.runtime.patching" in graph["pahq_fx.acdc.runtime"]
    assert "pahq_fx.model_io" in graph["pahq_fx.passes.trace"]


def test_no_import_cycle_inside_the_package():
    assert _cycles(_import_graph()) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
