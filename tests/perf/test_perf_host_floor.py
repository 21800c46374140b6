"""`tritonbn-perf host-floor`: what it runs and what it leaves behind (its numbers are a benchmark's, never
asserted here)."""

import pytest
import torch

import tritonbn
from tritonbn.perf import host_floor
from tritonbn.perf.cli import main

WAYS = ["eager BN + ReLU", "autograd.Function floor", "tritonbn", "  of which its launches"]


@pytest.mark.kernels
def test_rows_and_launches(device):
    rows = host_floor.measure(torch.device(device), calls=3, batches=2)
    assert [row["way"] for row in rows] == WAYS
    for row in rows:
        assert row["forward_us"] > 0 and row["total_us"] > row["forward_us"] * 0.5 and row["vs_eager"] > 0, row
    if device == "cpu":  # launches counted and skipped: the fused call's 2 + 2, the floor's none
        assert rows[2]["launches"] == 4 and rows[1]["launches"] == 0
    assert all(name in host_floor.format_table(rows, torch.device(device)) for name in WAYS)


@pytest.mark.kernels
def test_leaves_the_kernels_and_threads_as_they_were(device):
    """The launches run again afterwards (nothing stays patched), with the same number of threads."""
    threads = torch.get_num_threads()
    host_floor.measure(torch.device(device), calls=2, batches=1)
    assert torch.get_num_threads() == threads
    x = torch.randn(4, 3, 5, 5, device=device)
    mean, var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    y = tritonbn.batch_norm_act(x, mean.clone(), var.clone(), training=False)
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(x, mean, var, training=False)))


@pytest.mark.kernels
def test_command_prints_the_table(device, capsys):
    assert main(["host-floor", "--device", device, "--calls", "2", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "autograd.Function floor" in out
    assert ("every launch skipped" if device == "cpu" else "real launches") in out


def test_reference_path_is_refused(capsys):
    with tritonbn.cpu_reference():
        assert main(["host-floor", "--device", "cpu", "--calls", "2", "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET=1" in err and err.count("\n") == 1
