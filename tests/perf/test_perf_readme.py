"""`tritonbn-perf readme`: the results blocks of README.md (each device's latest run) and docs/results.md (every
run) come from the GPU CSVs under perf/results, not by hand."""

import json
import math
from pathlib import Path

import pytest

from tritonbn.perf import readme, results
from tritonbn.perf.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_block_is_generated_from_perf_results(capsys):
    assert main(["readme", "--check", "--readme", str(ROOT / "README.md"), "--results",
                 str(ROOT / "perf" / "results")]) == 0, capsys.readouterr().out


def sweep_row(shape, backend, e2e_ms, device_ms, timing="cuda-events", commit="abc1234",
              timestamp="2026-12-01T00:00:00"):
    row = dict.fromkeys(results.COLUMNS, "")
    row.update(preset="resnet50", shape=shape, dtype="bf16", layout="nhwc", activation="relu", residual=False,
               mode="fwd", backend=backend, status="ok", ok=True, timing=timing, e2e_ms=e2e_ms,
               device_ms=device_ms, host_us=1.0, device_method="cuda-graph", device="NVIDIA H100 80GB HBM3",
               torch="2.11.0", triton="3.6.0", cudnn="91900", git_commit=commit, timestamp=timestamp)
    return row


@pytest.fixture
def tree(tmp_path):
    """A README and a results page with empty blocks, a GPU sweep (with provenance), a CPU sweep and a traffic
    table."""
    (tmp_path / "README.md").write_text(f"# x\n\n## Results\n\n{readme.BEGIN}\n{readme.END}\n\n## Next\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text(f"# Results\n\n{readme.BEGIN}\n{readme.END}\n")
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
    (tree / "perf" / "results" / "h100" / "speedup_fwd.png").write_bytes(b"")  # the report's plot of the run
    assert run_readme(tree, "--check") == 1  # the blocks are still empty
    assert run_readme(tree) == 0
    text = (tree / "README.md").read_text()
    assert text.startswith("# x\n\n## Results\n\n") and text.endswith(f"{readme.END}\n\n## Next\n")
    block = readme.split(text)[1]
    assert "#### NVIDIA H100 80GB HBM3: a test run" in block
    assert "[`perf/results/h100/sweep.csv`](perf/results/h100/sweep.csv) (4 rows)" in block
    assert "tritonbn commit abc1234; torch 2.11.0, triton 3.6.0" in block  # the CSV's commit comes first
    assert "| mode | backend | e2e speedup vs eager | device speedup vs eager | configs |" in block
    assert "| fwd | tritonbn | 1 | 4 | 2 |" in block
    assert "](perf/results/h100/speedup_fwd.png)" in block  # the headline plot
    assert "2x3" not in block and "traffic" not in block  # the CPU sweep and other tables are left out
    page = readme.split((tree / "docs" / "results.md").read_text())[1]
    assert "[`../perf/results/h100/sweep.csv`](../perf/results/h100/sweep.csv) (4 rows)" in page  # from docs/
    assert "| fwd | tritonbn | 1 | 4 | 2 |" in page and ".png)" not in page
    assert run_readme(tree, "--check") == 0
    assert capsys.readouterr().out.count("results block up to date") == 2


def test_without_gpu_results_the_block_says_so(tree):
    for path in (tree / "perf" / "results" / "h100").iterdir():
        path.unlink()
    assert run_readme(tree) == 0
    assert "No GPU results under `perf/results/` yet." in (tree / "README.md").read_text()
    assert "No GPU results under `../perf/results/` yet." in (tree / "docs" / "results.md").read_text()


def test_readme_without_the_markers_exits_2(tree, capsys):
    (tree / "README.md").write_text("# no block here\n")
    assert run_readme(tree) == 2
    err = capsys.readouterr().err
    assert err.startswith("tritonbn-perf readme: error: ") and "no results block" in err and err.count("\n") == 1
    assert (tree / "README.md").read_text() == "# no block here\n"


def test_missing_history_page_exits_2(tree, capsys):
    (tree / "docs" / "results.md").unlink()
    assert run_readme(tree) == 2
    assert "no such file" in capsys.readouterr().err
    assert readme.split((tree / "README.md").read_text())[1] == f"{readme.BEGIN}\n{readme.END}"  # nothing written


def test_older_runs_follow_as_history_with_their_provenance(tree):
    """A run in a folder inside the device's, older than the device folder's own: on the results page it comes
    second, under History, labelled as the older run, with the commit its provenance.json records; the README
    shows the latest run and links the page."""
    older = tree / "perf" / "results" / "h100" / "first-run"
    older.mkdir()
    results.write_rows(older / "sweep.csv", [
        sweep_row("64x8x4x4", "eager", 1.0, math.nan, commit="unknown", timestamp="2026-01-05T00:00:00"),
        sweep_row("64x8x4x4", "tritonbn", 4.0, math.nan, commit="unknown", timestamp="2026-01-05T00:00:00")])
    (older / "provenance.json").write_text(json.dumps({"label": "the first run", "commit": "0123abc"}))
    assert run_readme(tree) == 0
    block = readme.split((tree / "README.md").read_text())[1]
    assert "#### NVIDIA H100 80GB HBM3: a test run" in block and "first-run" not in block
    assert "1 older run on NVIDIA H100 80GB HBM3 in the results history: [`docs/results.md`](docs/results.md)." \
        in block
    page = readme.split((tree / "docs" / "results.md").read_text())[1]
    latest = page.index("#### NVIDIA H100 80GB HBM3: a test run")
    history = page.index("#### History: older runs on NVIDIA H100 80GB HBM3")
    first = page.index("##### NVIDIA H100 80GB HBM3, older run of 2026-01-05: the first run")
    assert latest < history < first
    old_part = page[first:]
    assert "[`../perf/results/h100/first-run/sweep.csv`](../perf/results/h100/first-run/sweep.csv) (2 rows)" \
        in old_part
    assert "tritonbn commit 0123abc (from provenance.json; the CSV has none)" in old_part
    assert "| mode | backend | e2e speedup vs eager | configs |" in old_part  # no device time in that run
    assert "| fwd | tritonbn | 0.25 | 1 |" in old_part


def step_row(variant, step_ms, speedup, share, timing="cuda-events", status="ok"):
    return {"network": "resnet50", "model": "torchvision resnet50", "batch": 64, "dtype": "bf16", "layout": "nhwc",
            "variant": variant, "status": status, "step_ms": step_ms, "speedup_vs_eager": speedup,
            "bn_act_share_pct": share, "timing": timing, "git_commit": "unknown"}


def test_training_steps_of_a_run(tree):
    gpu = tree / "perf" / "results" / "h100"
    results.write_table([step_row("eager", 20.0, 1.0, 50.0), step_row("fused", 25.0, 0.8, 60.0),
                         step_row("compile", math.nan, math.nan, math.nan, status="skipped: no compiler")],
                        gpu / "step.csv")
    results.write_table([step_row("eager", 9.0, 1.0, 50.0, timing="interpreter")],
                        tree / "perf" / "results" / "cpu" / "step.csv")
    assert run_readme(tree) == 0
    block = readme.split((tree / "README.md").read_text())[1]
    assert "[`perf/results/h100/step.csv`](perf/results/h100/step.csv)" in block
    assert "| 64 | bf16 nhwc | fused | 25 | 0.8 | 60 |" in block
    assert "Not measured: compile (skipped: no compiler)." in block
    assert "| 9 |" not in block  # the CPU's step rows are no GPU result
