"""diffquant's modules import each other without cycles (module-level imports, read with ``ast``)."""

import ast
from pathlib import Path

import diffquant

PACKAGE_DIR = Path(diffquant.__file__).parent
ROOT = "diffquant"


def _module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module):
    """Import statements run when the module is imported: its body, and inside top-level if/try
    blocks (``if TYPE_CHECKING:`` blocks excluded); not those inside functions or classes."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]


def _targets(node, module: str, is_package: bool, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = {base} & modules
    found |= {f"{base}.{alias.name}" for alias in node.names} & modules  # ``from pkg import submodule``
    return found - {module}  # a package's ``__init__`` importing its own submodules


def _all_imports(tree: ast.Module):
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def import_graph(package_dir: Path = PACKAGE_DIR, *, deferred: bool = False) -> dict[str, set[str]]:
    """``{module: diffquant modules it imports}``: at module level, or also inside functions
    (``deferred=True``: a deferred import can hide a cycle, as the old ``affine`` <-> ``ranges`` pair did)."""
    files = {_module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    modules = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        imports = _all_imports(tree) if deferred else _module_level_imports(tree)
        graph[module] = set().union(*(_targets(n, module, is_package, modules) for n in imports))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None`` (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walker_sees_imports_and_finds_cycles():
    graph = import_graph()
    assert "diffquant.quant.primitives" in graph["diffquant.quant.ranges"]
    assert "diffquant.ptq.methods" in graph["diffquant"]  # ``from diffquant.ptq import methods``
    assert "diffquant.ptq.paths" not in graph["diffquant.nn.qmodules"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_diffquant_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_deferred_imports_hide_no_cycle_either():
    cycle = find_cycle(import_graph(deferred=True))
    assert cycle is None, f"import cycle through an import inside a function: {' -> '.join(cycle)}"


def test_no_module_imports_the_package_root():
    importers = sorted(m for m, imported in import_graph().items() if ROOT in imported)
    assert importers == [], f"{importers} import the package root {ROOT!r} (an upward import)"
