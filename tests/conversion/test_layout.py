"""The conversion subpackage: the op does not import it, and each module has one path."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tritonbn

PACKAGE = Path(tritonbn.__file__).parent
CONVERSION = ["fusion", "unfusion", "fx_patterns", "tracing", "fused_graph", "fused_sequential", "hooks"]


def test_each_module_lives_in_one_place():
    """The op's modules in tritonbn/, the conversion's in tritonbn/conversion/: no name in both, no alias."""
    op = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    conversion = {p.stem for p in (PACKAGE / "conversion").glob("*.py")} - {"__init__"}
    assert op and set(CONVERSION) <= conversion and not op & conversion
    for name in CONVERSION:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"tritonbn.{name}")


def _imports(path: Path) -> set[str]:
    """The modules a file imports, relative ones resolved against tritonbn's package."""
    package = ".".join(("tritonbn", *path.parent.relative_to(PACKAGE).parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_op_does_not_import_conversion():
    """One direction only: conversion builds on the op's modules, never the other way round."""
    op_modules = [p for p in [*PACKAGE.glob("*.py"), *PACKAGE.glob("sync/*.py")] if p.stem != "__init__"]
    assert {p.stem for p in op_modules} >= {"modules", "functional", "function", "activations"}
    for path in op_modules:
        assert not any(name.startswith("tritonbn.conversion") for name in _imports(path)), path.name


@pytest.mark.parametrize("first", ["tritonbn.conversion", "tritonbn.conversion.unfusion",
                                   "tritonbn.conversion.fused_graph"])
def test_each_entry_point_imports_on_its_own(first):
    """No import cycle: a fresh interpreter can start from any of them; still no triton or timm imported."""
    code = (f"import sys, {first}, tritonbn; assert tritonbn.fuse is tritonbn.conversion.fuse; "
            "assert 'triton' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
