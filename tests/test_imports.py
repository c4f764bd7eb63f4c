"""The package's layering: library modules never import an entrypoint, and the import graph has no cycle."""

import ast

import pytest

from conftest import REPO

PACKAGE = REPO / "ddpdiff"
ENTRYPOINTS = {"ddpdiff.train", "ddpdiff.train_sr", "ddpdiff.train_classifier", "ddpdiff.sample", "ddpdiff.eval"}


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, modules: set[str]) -> set[str]:
    """The package modules a file imports anywhere in it (a package import counts as its __init__)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            submodules = {f"{target}.{a.name}" for a in node.names} & modules  # `from . import x`: module x
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(target)
    ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}  # initialised before it anyway
    return {m for m in found if m in modules} - ancestors


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) - {module_name(f)} for f in files}


def entrypoints() -> set[str]:
    """The named entrypoints and every module with a `__main__` guard."""
    guarded = {module_name(f) for f in PACKAGE.rglob("*.py") if '__name__ == "__main__"' in f.read_text()}
    return ENTRYPOINTS | guarded


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checks_find_what_they_look_for():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    edges = graph()
    assert "ddpdiff.pipeline" in edges["ddpdiff.sample"] and "ddpdiff.loop" in edges["ddpdiff.train"]
    assert "ddpdiff.models.meta" in edges["ddpdiff.checkpoint"] and "ddpdiff.models" in edges["ddpdiff.pipeline"]
    assert entrypoints() >= ENTRYPOINTS


def test_the_import_graph_has_no_cycle():
    assert cycle(graph()) is None


@pytest.mark.parametrize("module", sorted(set(graph()) - entrypoints()))
def test_library_modules_import_no_entrypoint(module):
    assert not graph()[module] & entrypoints(), f"{module} imports {sorted(graph()[module] & entrypoints())}"
