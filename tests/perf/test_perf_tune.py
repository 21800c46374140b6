"""`tritonbn-perf tune`: every candidate configuration checked (timed on a GPU), the fastest correct one written
to the tuning table; `tritonbn-perf compile-check`; the memory-floor columns of the sweep."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tritonbn.kernels import configs
from tritonbn.perf import bandwidth, tune
from tritonbn.perf.cli import main
from tritonbn.perf.shapes import preset_shapes


def test_tune_on_a_cpu_checks_every_candidate_a_gpu_would_time(tmp_path, device):
    out = tmp_path / "tune.csv"
    table = tmp_path / "tuning.json"
    argv = ["tune", "--preset", "tiny", "--dtype", "fp32", "--layout", "nhwc", "--direction", "fwd,bwd",
            "--device", device, "--out", str(out), "--table", str(table)]
    assert main(argv) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    cases = {(r["shape"], r["direction"]) for r in rows}
    assert len(cases) == len(tune.cases(["tiny"], 64, ["fp32"], ["nhwc"], ["fwd", "bwd"])) == 4  # 4-D and 5-D
    for shape, direction in cases:
        mine = [r for r in rows if (r["shape"], r["direction"]) == (shape, direction)]
        wanted = tune.candidates_for(tune.Case("tiny", tuple(int(s) for s in shape.split("x")), "fp32", "nhwc",
                                               direction), torch.device(device))
        assert len(mine) == len(wanted) and all(r["ok"] == "True" for r in mine)
        assert {r["config_variant"] for r in mine} >= {"ticket", "merge"}
    if device == "cuda":  # timed: one pick per case, written to the table
        assert sum(r["picked"] == "True" for r in rows) == len(cases)
        assert len(json.loads(table.read_text())["entries"]) == len(cases)
    else:
        assert all(r["device_ms"] == "" for r in rows) and not table.exists()


def test_the_fastest_correct_candidate_is_picked_and_written_with_its_ranges(tmp_path):
    case = {"shape": "64x256x56x56", "dtype": "bf16", "layout": "nhwc", "direction": "bwd", "channels": 256,
            "rows": 64 * 56 * 56, "kernel_layout": "rows", "device": "NVIDIA H200"}
    fast, slow, wrong = (configs.KernelConfig(block_r=r) for r in (32, 64, 128))
    rows = [{**case, "heuristic": i == 0, "ok": ok, "device_ms": ms, "picked": pick,
             **{f"config_{k}": v for k, v in config.as_dict().items()}}
            for i, (config, ok, ms, pick) in enumerate([(slow, True, 2.0, False), (fast, True, 1.0, True),
                                                         (wrong, False, math.nan, False)])]
    entries = tune.table_entries(rows)
    assert len(entries) == 1 and configs.KernelConfig(**entries[0]["config"]) == fast
    assert entries[0]["heuristic_ms"] == 2.0 and entries[0]["c_min"] <= 256 <= entries[0]["c_max"] < 512
    path = tmp_path / "tuning.json"
    other = dict(entries[0], gpu="NVIDIA H100")
    path.write_text(json.dumps({"entries": [other, dict(entries[0], config=slow.as_dict())]}))
    tune.write_table(entries, path)
    written = json.loads(path.read_text())["entries"]
    assert other in written and entries[0] in written and len(written) == 2  # the stale H200 entry replaced


def test_floor_passes():
    assert bandwidth.floor_passes("fwd_bwd", False) == 8
    assert bandwidth.floor_passes("eval", False) == 2
    assert bandwidth.floor_passes("bwd", True, "relu") == 8 and bandwidth.floor_passes("bwd", True, "identity") == 6
    assert all(bandwidth.floor_passes(m, r) >= bandwidth.min_passes(m, r) for m in ("fwd", "bwd", "eval", "fwd_bwd")
               for r in (False, True))


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="no torch.library.triton_op")
def test_compile_check_plans_gpu_launches_without_a_gpu(tmp_path):
    """The plans for a 132-SM GPU, persistent grid included, compile to sm_90 machine code here (a small run: one
    shape, one dtype; `tritonbn-perf compile-check` runs them all)."""
    code = """
import torch
from tritonbn.kernels import configs
from tritonbn.perf import compile_check
with compile_check.gpu_target(90, 132) as compiled:
    config = configs.candidates("fwd", torch.bfloat16, "rows", 8, 32, 49, 132)
    persistent = next(c for c in config if c.variant == "persistent")
    compile_check._run_plans((8, 32, 7, 7), torch.bfloat16, "nhwc", "relu", persistent, True,
                             compile_check.NEEDS[1:2])
kernels = [k for k in compiled if k is not None]
print(len(compiled), len(kernels), sum(bool(k.metadata.launch_cooperative_grid) and "acquire" in k.asm["ptx"]
                                      for k in kernels))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    launches, kernels, with_barrier = map(int, done.stdout.split()[-3:])
    # Training forward (also as a module's call, counting its batch, with momentum and momentum=None), its backward
    # and eval's backward (which sums for the weight gradient): one cooperative launch each, spinning on an acquire
    # load at the barrier; eval forward: one ordinary launch.
    assert launches == kernels == 6 and with_barrier == 5


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="no torch.library.triton_op")
def test_compile_check_plans_gpu_tiles_and_reports_registers_and_spills():
    """Without a configuration, compile-check compiles what the heuristic picks on a GPU (128-channel bf16 rows,
    not the interpreter's 16), and ptxas's report tells a spilling tile (128 elements a thread: kilobytes of spill
    stores in backward's partials on ResNet-50's largest bf16 shape, with triton 3.6 and 3.9) from the
    heuristic's."""
    code = """
import json, torch
from tritonbn.kernels import configs
from tritonbn.perf import compile_check
spilling = configs.KernelConfig("ticket", 128, 128, 1, 4)
heuristic = 0
with compile_check.gpu_target(90, 132) as compiled:
    for config in (None, spilling):
        compile_check._run_plans((64, 256, 56, 56), torch.bfloat16, "nhwc", "relu", config, True,
                                 compile_check.NEEDS[1:2])
        heuristic = heuristic if config else len(compiled)
rows = compile_check.resources([k for k in compiled if k is not None], 90)
by_tile = {}
for row in rows:
    by_tile.setdefault((row["block_r"], row["block_c"], row["num_warps"]), []).append(row)
blocks = {compile_check._constants(k)["BLOCK_C"] for k in compiled[:heuristic]}
spills = max(row["spill_stores"] for row in by_tile[(128, 128, 4)])
regs = min(row["registers"] for row in rows)
heuristic_spills = max(row["spill_stores"] for tile, group in by_tile.items() if tile != (128, 128, 4) for row in group)
print(json.dumps({"blocks": sorted(blocks), "spills": spills, "registers": regs, "heuristic_spills": heuristic_spills}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["blocks"] == [128]
    assert found["spills"] > 1000 and found["heuristic_spills"] == 0 and found["registers"] > 0, found


def test_no_candidate_holds_more_than_its_threads_can_keep_in_registers():
    for case in preset_shapes("resnet50", 64):
        N, C, S = case.shape[0], case.shape[1], math.prod(case.shape[2:])
        for dtype in (torch.bfloat16, torch.float32):
            itemsize = torch.empty((), dtype=dtype).element_size()
            for layout in ("rows", "planes"):
                for direction in configs.DIRECTIONS:
                    found = configs.candidates(direction, dtype, layout, N, C, S, 132)
                    assert len(found) > 2
                    for c in found:
                        per_thread = c.block_r * c.block_c * itemsize // (32 * c.num_warps)
                        assert per_thread <= configs.MAX_TILE_BYTES_PER_THREAD, c


def test_compile_check_refuses_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["compile-check"]) == 2
    assert "without TRITON_INTERPRET" in capsys.readouterr().err
