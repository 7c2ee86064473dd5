"""The house's structure: no import circle among softprompt's modules (imports inside functions counted), every
import of softprompt's own modules at the top of its module, and a function-level import only to defer a heavy
optional dependency, which its line says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "softprompt"


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its __init__)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[ast.stmt, str, bool]]:
    """(statement, imported softprompt module, at module level) for each softprompt module `name` imports: what
    `import a.b.c` or `from a.b import c` runs, the module itself and, for `from`, a submodule named in it."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    type_checking = {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}  # packages `name` sits in
        for target in targets:
            parts = target.split(".")
            # importing a module runs the packages above it too (not the root, nor those already running `name`)
            above = [".".join(parts[:i]) for i in range(2, len(parts))]
            for module in [*above, target]:
                if module in modules and module != name and module not in own and (
                        module != PACKAGE or isinstance(node, ast.ImportFrom)):
                    out.append((node, module, id(node) in top))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node, target, _ in _imports(name, path, modules):
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            if names and all(f"{target}.{n}" in modules for n in names):
                continue  # `from package import submodule` runs the submodule, edged above
            graph[name].add(target)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or of one that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    graph = _graph()
    assert len(graph) > 40  # the whole package was read
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_imports_sit_at_the_top_unless_they_defer_an_optional_dependency():
    modules = _modules()
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for node, target, at_top in _imports(name, path, modules):
            assert at_top, f"{path}:{node.lineno} imports {target} inside a function"
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and not _under_type_checking(
                    tree, node):
                said = " ".join(lines[node.lineno - 1:node.end_lineno])
                assert "# deferred" in said, f"{path}:{node.lineno}: a function-level import without '# deferred: why'"


def _under_type_checking(tree: ast.Module, target: ast.AST) -> bool:
    return any(isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and any(
        n is target for n in ast.walk(node)) for node in tree.body)


@pytest.mark.parametrize("module", ["softprompt.families", "softprompt.methods", "softprompt.tensor_names"])
def test_leaf_modules_import_nothing_heavier_than_they_say(module):
    """The model facts and the method registry are leaves: nothing of softprompt's above them."""
    graph = _graph()
    allowed = {"softprompt.errors", "softprompt.config", "softprompt.methods", "softprompt.methods.prefix",
               "softprompt.methods.prefix.config", "softprompt.methods.ptuning", "softprompt.methods.ptuning.config",
               "softprompt.tensor_names"}
    assert graph[module] <= allowed, graph[module] - allowed
