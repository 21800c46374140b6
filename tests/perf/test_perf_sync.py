"""`tritonbn-perf sync`'s measurement in one process: a gloo group of one on a CPU, where the rows carry counts and
no times, and nn.SyncBatchNorm's row says it cannot run."""

import os
import tempfile

import torch
import torch.distributed as dist

from tritonbn.perf import cli, sync


def test_rows_count_one_collective_each_way_and_no_host_sync():
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init')}", rank=0, world_size=1)
        try:
            rows = sync.measure_rank(0, 1, "cpu", [(3, 4, 2, 2)], torch.float64, calls=1)
        finally:
            dist.destroy_process_group()
    fused, torch_row = rows
    assert set(fused) == set(sync.COLUMNS)
    assert (fused["way"], fused["collectives_forward"], fused["collectives_backward"], fused["host_syncs"]) == (
        "tritonbn", 1, 1, 0)
    assert fused["device_ms"] == "" and torch_row["note"]  # no times on a CPU; nn.SyncBatchNorm is CUDA only
    assert "tritonbn | 3x4x2x2 | 1 | 1 | 1 | 0" in sync.format_table(rows)


def test_sync_command_parses():
    args = cli.build_parser("sync").parse_args(["sync", "--shape", "2,3,4", "--world-size", "3", "--dtype", "fp64"])
    assert (args.shape, args.world_size, args.dtype, args.calls) == ([(2, 3, 4)], 3, "fp64", 50)
