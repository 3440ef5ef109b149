"""The library never imports the benchmark: no non-bench module reaches a ``diffquant.bench`` module
through the imports that run when it is imported (module level, class bodies, ``try``/``if`` blocks;
not function bodies, which import lazily, nor ``if TYPE_CHECKING:`` blocks).

The import graph is read from the source with ``ast`` (milliseconds) instead of importing every module
in a fresh interpreter (a minute and more on 2 CPU cores, most of it loading diffusers).
"""

import ast
import functools
import importlib
from pathlib import Path

import diffquant

ROOT = Path(diffquant.__file__).resolve().parent


def _library_modules() -> list[str]:
    """Every module under src/diffquant outside diffquant.bench, found on disk (nothing imported)."""
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("diffquant", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith("diffquant.bench"):
            names.append(name)
    return names


def _source(name: str) -> Path | None:
    parts = name.split(".")[1:]
    package = ROOT.joinpath(*parts, "__init__.py")
    if package.is_file():
        return package
    module = ROOT.joinpath(*parts[:-1], f"{parts[-1]}.py") if parts else None
    return module if module is not None and module.is_file() else None


def _run_at_import(stmts: list[ast.stmt]) -> list[ast.stmt]:
    """The statements executed when the module is imported (recursively into blocks, not functions)."""
    out = []
    for node in stmts:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out += _run_at_import(node.orelse)
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody"):
            out += _run_at_import(getattr(node, field, []))
        for handler in getattr(node, "handlers", []):
            out += _run_at_import(handler.body)
    return out


@functools.cache
def imported_modules(name: str) -> frozenset[str]:
    """The ``diffquant`` modules (and their parent packages) that importing ``name`` imports directly."""
    path = _source(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _run_at_import(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules, if they are ones
    modules = {m for m in found if m.startswith("diffquant") and _source(m) is not None}
    parents = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    return frozenset(modules | {p for p in parents if _source(p) is not None})  # namespace packages: no code


def reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imported_modules(module)
    return seen


def test_library_modules_do_not_load_the_benchmark():
    offenders = {
        name: sorted(m for m in reachable(name) if m.startswith("diffquant.bench"))
        for name in _library_modules()
    }
    offenders = {name: bench for name, bench in offenders.items() if bench}
    assert not offenders, f"library modules load benchmark modules when imported: {offenders}"


def test_the_import_walk_sees_imports():
    """The walk finds what the benchmark imports (so an empty answer above means something)."""
    assert {"diffquant.bench.digits.cache", "diffquant.bench.row_runner", "diffquant.api"} <= reachable(
        "diffquant.bench.demo"
    )
    assert "diffquant.bench.demo" not in reachable("diffquant.cli")  # imported inside a function: lazily


def test_walk_finds_the_library():
    names = _library_modules()
    assert "diffquant.api" in names and "diffquant.nn.qmodules" in names
    assert importlib.import_module("diffquant.bench.demo")  # the benchmark itself still imports
