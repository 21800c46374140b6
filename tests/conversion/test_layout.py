"""The conversion subpackage: the op does not import it, and the modules' old paths still work."""

import ast
import importlib
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn import conversion

PACKAGE = Path(tritonbn.__file__).parent
MOVED = ["fusion", "unfusion", "fx_patterns", "tracing", "fused_graph", "fused_sequential", "hooks"]


@pytest.mark.parametrize("name", MOVED)
def test_old_path_is_the_moved_module(name):
    moved = importlib.import_module(f"tritonbn.conversion.{name}")
    assert importlib.import_module(f"tritonbn.{name}") is moved
    assert getattr(tritonbn, name) is moved  # `import tritonbn; tritonbn.fusion.fuse` as before


def test_old_paths_of_public_names():
    from tritonbn.fused_graph import FusedGraphModule, fused_residual_act
    from tritonbn.fused_sequential import FusedSequential
    from tritonbn.fusion import FuseReport, fuse
    from tritonbn.unfusion import BatchNormThenAct2d, unfuse

    assert (fuse, unfuse, FuseReport) == (tritonbn.fuse, tritonbn.unfuse, tritonbn.FuseReport)
    assert FusedSequential is conversion.FusedSequential
    assert FusedGraphModule.__module__ == fused_residual_act.__module__ == "tritonbn.conversion.fused_graph"
    assert BatchNormThenAct2d.__module__ == "tritonbn.conversion.unfusion"


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
    op_modules = [p for p in PACKAGE.glob("*.py") if p.stem not in (*MOVED, "__init__")]
    assert {p.stem for p in op_modules} >= {"modules", "functional", "sync", "activations"}
    for path in op_modules:
        assert not any(name.startswith("tritonbn.conversion") for name in _imports(path)), path.name


@pytest.mark.parametrize("first", ["tritonbn.conversion", "tritonbn.conversion.unfusion", "tritonbn.fused_graph"])
def test_each_entry_point_imports_on_its_own(first):
    """No import cycle: a fresh interpreter can start from any of them; still no triton or timm imported."""
    code = (f"import sys, {first}, tritonbn; assert tritonbn.fuse is tritonbn.conversion.fuse; "
            "assert 'triton' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


class OldPaths(pickle.Unpickler):
    """Reads a pickle as if written before the move: every tritonbn.conversion.X it names is looked up
    as tritonbn.X, and must be there."""

    def __init__(self, file):
        super().__init__(file)
        self.looked_up = []

    def find_class(self, module, name):
        if module.startswith("tritonbn.conversion."):
            module = module.replace("tritonbn.conversion.", "tritonbn.")
            self.looked_up.append(f"{module}.{name}")
        return super().find_class(module, name)


def test_models_pickled_with_the_old_paths_load():
    """A checkpoint written before the move names tritonbn.fused_graph (and fused_sequential, ...)."""
    fused = tritonbn.fuse(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()))
    unpickler = OldPaths(io.BytesIO(pickle.dumps(fused)))
    old = unpickler.load()
    assert "tritonbn.fused_graph._rebuild_fused_graph_module" in unpickler.looked_up
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(old.eval()(x), fused.eval()(x))
