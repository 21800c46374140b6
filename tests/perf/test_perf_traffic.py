"""The traffic counter counts exactly what a kernel moves, and the audit holds the kernels to their budgets."""

import os

import pytest
import torch

from tritonbn.perf import traffic
from tritonbn.perf.cli import main

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts the Triton interpreter's loads and stores; the CPU suite runs it")

import triton  # noqa: E402  (after the interpreter switch, which conftest sets before any test module)
import triton.language as tl  # noqa: E402


@triton.jit
def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)


@triton.jit
def sum_kernel(total, src, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(total, tl.sum(tl.load(src + offsets, mask=offsets < n, other=0.0)))


def test_counts_masked_lanes_launches_and_atomics():
    n = int(torch.randint(40, 120, ()).item())  # a ragged tail: the last program's mask is partly false
    src = torch.randn(n, dtype=torch.float64)
    dst = torch.empty_like(src)
    total = torch.zeros(1, dtype=torch.float64)
    blocks = triton.cdiv(n, 32)
    with traffic.count_traffic() as t:
        copy_kernel[(blocks,)](src, dst, n, BLOCK=32)
        copy_kernel[(blocks,)](src.half(), dst.half(), n, BLOCK=32)
        sum_kernel[(blocks,)](total, src, n, BLOCK=32)
    assert torch.equal(dst, src) and torch.allclose(total, src.sum())
    assert t.launches == 3
    assert t.kernels["copy_kernel"].launches == 2
    assert t.kernels["copy_kernel"].bytes_loaded == t.kernels["copy_kernel"].bytes_stored == n * 8 + n * 2
    # one atomic read-modify-write of 8 bytes per program, on top of the masked loads
    assert t.kernels["sum_kernel"].bytes_loaded == n * 8 + blocks * 8
    assert t.kernels["sum_kernel"].bytes_stored == blocks * 8
    assert t.bytes_loaded == 2 * n * 8 + n * 2 + blocks * 8


def test_restores_the_interpreter_even_on_error():
    from triton.runtime import interpreter

    originals = (interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store,
                 interpreter.GridExecutor.__call__)
    with pytest.raises(KeyError), traffic.count_traffic():
        raise KeyError("inside the block")
    assert (interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store,
            interpreter.GridExecutor.__call__) == originals
    with traffic.count_traffic() as t:
        pass
    assert (t.bytes_loaded, t.bytes_stored, t.launches) == (0, 0, 0)


def test_needs_the_interpreter(monkeypatch):
    # as in a process whose kernels were compiled: tritonbn.backend's answer, not the variable, decides
    monkeypatch.setattr(traffic.backend, "kernels_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"), traffic.count_traffic():
        pass
    assert main(["traffic"]) == 2


# eager PyTorch, one op at a time (BN + ReLU, then with the residual add)
EAGER = {("fwd", False): 5, ("bwd", False): 8, ("eval", False): 4, ("fwd", True): 8, ("bwd", True): 8,
         ("eval", True): 7}


def test_audit_within_budget():
    # channels_last here; tests/kernels/test_traffic.py holds the contiguous layout to the same budgets
    rows = traffic.audit((8, 4, 32, 32), activation="relu", layout="nhwc")
    assert [(r["mode"], r["residual"]) for r in rows] == [(m, res) for res in (False, True) for m in
                                                           ("fwd", "bwd", "eval")]
    for row in rows:
        key = (row["mode"], row["residual"])
        assert row["launches"] >= 1
        assert row["eager"] == EAGER[key]
        assert row["minimum"] <= row["passes"], row
        # The guard: a kernel that moves more than its budget fails CI.
        assert row["passes"] <= traffic.budget(*key) + traffic.PER_CHANNEL_SLACK, row
        assert row["within_budget"]


def test_traffic_command_writes_table_and_csv(tmp_path, capsys):
    out = tmp_path / "traffic.csv"
    assert main(["traffic", "--shape", "4,2,16,16", "--out", str(out), "--check"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:6] == ["mode", "residual", "passes", "minimum", "budget", "eager"]
    assert len(out.read_text().splitlines()) == 7
