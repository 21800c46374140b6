"""The sweep on CPU with the tiny preset: CSV schema, values, the e2e/device/host split, and replacement of
re-run rows. `--device cpu` runs the kernels under the interpreter on a CPU-only machine and the reference
path on a GPU machine (whose kernels are compiled); the rows must say which, and these tests hold on both."""

import csv
import math
import subprocess

import pytest
import torch

from tritonbn import backend as tritonbn_backend
from tritonbn.perf import checks, results, sweep
from tritonbn.perf.backends import Backend, eager_batch_norm_act
from tritonbn.perf.cli import main
from tritonbn.perf.shapes import ShapeCase, preset_shapes

MODES = ("fwd", "bwd", "fwd_bwd", "eval")
PASSES = {"fwd": 2, "bwd": 3, "fwd_bwd": 5, "eval": 2}


@pytest.fixture(scope="module")
def one_thread():
    # Two busy cores and OpenMP's spinning threads make tiny CPU ops take tens of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("sweep") / "results.csv"
    assert main(["sweep", "--preset", "tiny", "--backend", "tritonbn,eager", "--device", "cpu", "--out",
                 str(path), "--no-progress"]) == 0
    return path


def test_schema(tiny_csv):
    with open(tiny_csv, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == results.COLUMNS
        raw = list(reader)
    shapes = {case.label for case in preset_shapes("tiny")}
    assert {r["shape"] for r in raw} == shapes
    # one row per (shape, mode, backend): tiny has no channels_last variant of its 2-D and 5-D shapes
    assert len(raw) == len({results.row_key(r) for r in raw}) == len(shapes) * len(MODES) * 2


def test_values(tiny_csv):
    rows = results.read_rows(tiny_csv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    interpreted = tritonbn_backend.uses_kernels(torch.empty(0))
    by_key = {results.row_key(r): r for r in rows}
    for row in rows:
        assert row["status"] == "ok" and row["ok"], row
        tritonbn_label = "interpreter" if interpreted else "cpu-reference"
        assert row["timing"] == (tritonbn_label if row["backend"] == "tritonbn" else "cpu-pytorch")
        assert row["device"].startswith("cpu") and row["torch"] == torch.__version__
        assert row["git_commit"] in (commit or "unknown", "unknown")
        assert row["e2e_ms"] > 0 and row["e2e_p20_ms"] <= row["e2e_ms"] <= row["e2e_p80_ms"]
        numel = math.prod(int(s) for s in row["shape"].split("x"))
        assert row["min_bytes"] == PASSES[row["mode"]] * numel * 4
        assert row["gbps"] == pytest.approx(row["min_bytes"] / row["e2e_ms"] / 1e6)
        assert row["pct_copy_bw"] == pytest.approx(100 * row["gbps"] / row["copy_gbps"])
        assert row["device_gbps"] == pytest.approx(row["min_bytes"] / row["device_ms"] / 1e6)
        assert math.isnan(row["peak_mem_bytes"])  # measured on CUDA only
        eager = by_key[results.row_key(row)[:-1] + ("eager",)]
        for kind in ("e2e", "device"):
            assert row[f"{kind}_speedup_vs_eager"] == pytest.approx(eager[f"{kind}_ms"] / row[f"{kind}_ms"])
            assert math.isnan(row[f"{kind}_speedup_vs_compile"])  # compile was not run
        # checked against float64: fp32 rounding only, no mask flip on shapes this small
        assert 0 <= row["err_rel_l2"] <= checks.REL_L2["fp32"] and row["err_outliers"] == 0
        if row["mode"] == "eval":
            assert row["saved_bytes"] == 0
        elif row["backend"] == "eager" and row["mode"] != "bwd":
            # eager saves x (an input) and ReLU's output, a tensor the network would not otherwise keep
            assert row["saved_extra_bytes"] >= numel * 4 and row["saved_bytes"] >= row["saved_extra_bytes"] + numel * 4
        elif row["backend"] == "tritonbn" and interpreted and row["mode"] != "bwd":
            # the kernels' workspace (mean, rstd and room for backward's sums) on the Function's context, which
            # no saved-tensor hook sees: counted all the same
            assert row["saved_extra_bytes"] > 0


def test_each_row_records_when_it_was_measured(tiny_csv):
    with open(tiny_csv, newline="") as f:
        stamps = [r["timestamp"] for r in csv.DictReader(f)]
    assert stamps == sorted(stamps) and all(stamp.endswith("+00:00") for stamp in stamps)


def test_device_and_host_split(tiny_csv):
    """Interpreted kernels are counted and timed apart from the host's work; everything else is `reference`."""
    rows = results.read_rows(tiny_csv)
    interpreted = tritonbn_backend.uses_kernels(torch.empty(0))
    for row in rows:
        assert row["host_us"] > 0 and row["device_ms"] > 0
        if row["backend"] == "tritonbn" and interpreted:
            assert row["device_method"] == "interpreter"
            # the kernels run inside the call: their time is part of it
            assert row["device_ms"] <= row["e2e_ms"]
            assert row["launches"] >= 1 and row["launches"] == int(row["launches"])
        else:  # eager, or tritonbn's reference path: all of the call runs on the CPU, no Triton launch
            assert row["device_method"] == "reference"
            assert row["device_ms"] == row["e2e_ms"] and row["host_us"] == pytest.approx(row["e2e_ms"] * 1e3)
            assert math.isnan(row["launches"])
    for row in rows:  # the host's time of a training call, split into its forward and backward
        split = (row["host_fwd_us"], row["host_bwd_us"])
        assert all(v > 0 for v in split) if row["mode"] == "fwd_bwd" else all(math.isnan(v) for v in split)
    if interpreted:
        launches = {(r["shape"], r["mode"]): r["launches"] for r in rows if r["backend"] == "tritonbn"}
        for shape in {shape for shape, _ in launches}:
            assert launches[shape, "fwd_bwd"] == launches[shape, "fwd"] + launches[shape, "bwd"]
            assert launches[shape, "eval"] <= launches[shape, "fwd"]


def test_rerun_replaces_rows(tiny_csv, tmp_path, one_thread):
    path = tmp_path / "results.csv"
    path.write_bytes(tiny_csv.read_bytes())
    rows = results.read_rows(path)
    stale = next(r for r in rows if r["shape"] == "6x8" and r["mode"] == "fwd" and r["backend"] == "eager")
    stale["e2e_ms"] = 12345.0
    results.write_rows(path, [stale])
    assert len(results.read_rows(path)) == len(rows)
    args = ["sweep", "--shape", "6,8", "--mode", "fwd", "--backend", "eager,tritonbn", "--device", "cpu",
            "--no-progress", "--out", str(path)]
    assert main(args) == 0
    assert main(args + ["--residual"]) == 0  # a new configuration: added, not replacing
    merged = results.read_rows(path)
    assert len(merged) == len(rows) + 2
    again = [r for r in merged if r["shape"] == "6x8" and r["mode"] == "fwd" and not r["residual"]]
    assert len(again) == 2 and all(r["e2e_ms"] < 12345.0 for r in again)
    assert {r["preset"] for r in again} == {"custom"}
    assert sum(r["residual"] for r in merged) == 2


def test_old_csv_is_read_and_merged(tiny_csv, tmp_path):
    """A CSV from before the device/host split (median_ms, speedup_vs_eager, no device columns) stays usable."""
    old = tmp_path / "old.csv"
    renamed = {new: old_name for old_name, new in results.RENAMED.items()}
    dropped = {"device_method", "device_ms", "host_us", "launches", "device_gbps", "device_pct_copy_bw",
               "device_speedup_vs_eager", "device_speedup_vs_compile", "err_rel_l2", "err_outliers"}
    with open(tiny_csv, newline="") as f, open(old, "w", newline="") as g:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames if c not in dropped]
        writer = csv.DictWriter(g, fieldnames=[renamed.get(c, c) for c in columns])
        writer.writeheader()
        writer.writerows({renamed.get(c, c): r[c] for c in columns} for r in reader)
    rows = results.read_rows(old)
    new = results.read_rows(tiny_csv)
    assert [r["e2e_ms"] for r in rows] == [r["e2e_ms"] for r in new]
    assert all(math.isnan(r["device_ms"]) and r["device_method"] == "" for r in rows)
    merged = results.write_rows(old, [])
    assert all(math.isnan(r["device_speedup_vs_eager"]) for r in merged)
    assert [r["e2e_speedup_vs_eager"] for r in merged] == pytest.approx([r["e2e_speedup_vs_eager"] for r in new])


def wrong_bias(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, **kwargs):
    return eager_batch_norm_act(input, running_mean, running_var, weight, bias + 0.5, training, momentum, eps,
                                **kwargs)


def broken(*args, **kwargs):
    raise RuntimeError("kernel exploded")


def test_wrong_and_failing_backends_are_flagged_not_timed(tmp_path, one_thread):
    cfgs = sweep.configs([("tiny", ShapeCase((4, 3, 2, 2)))], ["fp32"], ["nchw"], ["relu"], [False], ["fwd"])
    backends = [Backend("eager", eager_batch_norm_act), Backend("wrong", wrong_bias), Backend("broken", broken)]
    rows = sweep.run(cfgs, backends, {"apex": "not importable here"}, torch.device("cpu"),
                     str(tmp_path / "r.csv"), progress=False)
    status = {r["backend"]: r for r in rows}
    assert status["eager"]["ok"]
    assert status["wrong"]["status"].startswith("mismatch: y:") and not status["wrong"]["ok"]
    assert math.isnan(status["wrong"]["e2e_speedup_vs_eager"])
    assert status["broken"]["status"] == "error: RuntimeError: kernel exploded"
    assert status["apex"]["status"] == "skipped: not importable here"
    assert math.isnan(status["apex"]["e2e_ms"]) and math.isnan(status["apex"]["device_ms"])
