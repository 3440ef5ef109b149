"""The library never imports the benchmark: every non-bench module imports without loading one."""

import importlib
import pkgutil
import subprocess
import sys

import diffquant


def _library_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(diffquant.__path__, prefix="diffquant."):
        if not info.name.startswith("diffquant.bench"):
            names.append(info.name)
    return names


def test_library_modules_do_not_load_the_benchmark():
    code = (
        "import importlib, sys\n"
        f"for name in {_library_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('diffquant.bench'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"library modules loaded benchmark modules: {result.stdout}"


def test_walk_finds_the_library():
    names = _library_modules()
    assert "diffquant.api" in names and "diffquant.nn.qmodules" in names
    assert importlib.import_module("diffquant.bench.demo")  # the benchmark itself still imports
