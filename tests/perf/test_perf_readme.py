"""`tritonbn-perf readme`: the README's results block comes from the GPU CSVs under perf/results, not by hand."""

import json
from pathlib import Path

import pytest

from tritonbn.perf import readme, results
from tritonbn.perf.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_block_is_generated_from_perf_results(capsys):
    assert main(["readme", "--check", "--readme", str(ROOT / "README.md"), "--results",
                 str(ROOT / "perf" / "results")]) == 0, capsys.readouterr().out


def sweep_row(shape, backend, e2e_ms, device_ms, timing="cuda-events", commit="abc1234"):
    row = dict.fromkeys(results.COLUMNS, "")
    row.update(preset="resnet50", shape=shape, dtype="bf16", layout="nhwc", activation="relu", residual=False,
               mode="fwd", backend=backend, status="ok", ok=True, timing=timing, e2e_ms=e2e_ms,
               device_ms=device_ms, host_us=1.0, device_method="cuda-graph", device="NVIDIA H100 80GB HBM3",
               torch="2.11.0", triton="3.6.0", cudnn="91900", git_commit=commit, timestamp="2026-12-01T00:00:00")
    return row


@pytest.fixture
def tree(tmp_path):
    """A README with an empty block, a GPU sweep (with provenance), a CPU sweep and a traffic table."""
    (tmp_path / "README.md").write_text(f"# x\n\n## Results\n\n{readme.BEGIN}\n{readme.END}\n\n## Next\n")
    gpu = tmp_path / "perf" / "results" / "h100"
    gpu.mkdir(parents=True)
    # tritonbn: e2e 2x slower on one shape, 2x faster on the other (geomean 1); device 4x faster on both
    results.write_rows(gpu / "sweep.csv", [
        sweep_row("64x8x4x4", "eager", 1.0, 4.0), sweep_row("64x8x4x4", "tritonbn", 2.0, 1.0),
        sweep_row("64x8x2x2", "eager", 2.0, 2.0), sweep_row("64x8x2x2", "tritonbn", 1.0, 0.5)])
    (gpu / "provenance.json").write_text(json.dumps({"label": "a test run", "commit": "not-this-one"}))
    cpu = tmp_path / "perf" / "results" / "cpu"
    cpu.mkdir()
    results.write_rows(cpu / "sweep.csv", [sweep_row("2x3", "eager", 1.0, 1.0, timing="interpreter")])
    (cpu / "traffic.csv").write_text("mode,residual,passes\nfwd,False,2.0\n")
    return tmp_path


def run_readme(tree, *extra):
    return main(["readme", "--readme", str(tree / "README.md"), "--results", str(tree / "perf" / "results"), *extra])


def test_block_holds_the_gpu_sweeps_geomeans(tree, capsys):
    assert run_readme(tree, "--check") == 1  # the block is still empty
    assert run_readme(tree) == 0
    text = (tree / "README.md").read_text()
    assert text.startswith("# x\n\n## Results\n\n") and text.endswith(f"{readme.END}\n\n## Next\n")
    block = readme.split(text)[1]
    assert "#### NVIDIA H100 80GB HBM3: a test run" in block
    assert "[`perf/results/h100/sweep.csv`](perf/results/h100/sweep.csv) (4 rows)" in block
    assert "tritonbn commit abc1234; torch 2.11.0, triton 3.6.0" in block  # the CSV's commit comes first
    assert "| mode | backend | e2e speedup vs eager | device speedup vs eager | configs |" in block
    assert "| fwd | tritonbn | 1 | 4 | 2 |" in block
    assert "2x3" not in block and "traffic" not in block  # the CPU sweep and other tables are left out
    assert run_readme(tree, "--check") == 0
    assert "up to date" in capsys.readouterr().out


def test_without_gpu_results_the_block_says_so(tree):
    for path in (tree / "perf" / "results" / "h100").iterdir():
        path.unlink()
    assert run_readme(tree) == 0
    assert "No GPU results under `perf/results/` yet." in (tree / "README.md").read_text()


def test_readme_without_the_markers_exits_2(tree, capsys):
    (tree / "README.md").write_text("# no block here\n")
    assert run_readme(tree) == 2
    err = capsys.readouterr().err
    assert err.startswith("tritonbn-perf readme: error: ") and "no results block" in err and err.count("\n") == 1
    assert (tree / "README.md").read_text() == "# no block here\n"
