"""report: the plots are valid PNGs and report.md says what the numbers are, loudly when not performance.

The CSV comes from `sweep --device cpu`: interpreter timings on a CPU-only machine, reference-path timings
on a GPU machine. Both hold a device/host split for every row, so the same files are expected on both.
"""

import csv

import pytest
import torch
from png_check import assert_png

from tritonbn.perf import results
from tritonbn.perf.cli import main


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny CPU ops on two busy cores are slow with several threads
    path = tmp_path_factory.mktemp("report") / "results.csv"
    try:
        assert main(["sweep", "--preset", "tiny", "--mode", "fwd,fwd_bwd", "--backend", "tritonbn,eager",
                     "--device", "cpu", "--out", str(path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return path


def test_report_files(tiny_csv, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(tiny_csv), "--out", str(out)]) == 0
    pngs = {"speedup_fwd.png", "speedup_fwd_bwd.png", "device_speedup_fwd.png", "device_speedup_fwd_bwd.png",
            "overhead_fp32_nchw.png", "bandwidth.png", "memory.png"}
    assert {p.name for p in out.iterdir()} == pngs | {"report.md"}
    for name in pngs:
        assert_png(out / name)
    md = (out / "report.md").read_text()
    assert "**Warning: these timings are not performance.**" in md.splitlines()[2]
    assert f"torch {torch.__version__}" in md and "Device: cpu" in md
    stamps = sorted(r["timestamp"] for r in results.read_rows(tiny_csv))  # each row's own time
    measured = f"- Measured: {stamps[0]} to {stamps[-1]} (the first and the last row's)" if stamps[0] != stamps[-1] \
        else f"- Measured: {stamps[0]} (every row records this one time"
    assert measured in md
    assert "`cpu-pytorch` (wall time on a CPU, PyTorch's own CPU code): eager" in md  # eager's label is its own
    assert "| fwd | tritonbn |" in md and "| fwd_bwd | tritonbn |" in md
    assert "| mode | backend | e2e vs eager | e2e vs compile | device vs eager | device vs compile | configs |" in md
    assert "## Host- or device-bound, per shape" in md and "## Slowest shapes" in md
    assert "## Host time per training call: forward and backward" in md
    assert "## Against the memory floor (device time)" in md
    for name in pngs:
        assert f"]({name})" in md


def gpu_like(rows, host_bound_shapes):
    """The rows relabelled as if a GPU had measured them, with tritonbn host-bound on the given shapes:
    only labels and the host/device relation matter to the report, not the values themselves."""
    for row in rows:
        row.update(timing="cuda-events", device="NVIDIA H100 80GB HBM3", device_method="cuda-graph")
        if row["backend"] == "tritonbn":
            ratio = 10.0 if row["shape"] in host_bound_shapes else 0.1
            row["host_us"] = row["device_ms"] * 1e3 * ratio
    return rows


def test_bound_table_and_overhead_plot(tiny_csv, tmp_path):
    rows = gpu_like(results.read_rows(tiny_csv), host_bound_shapes={"6x8"})
    path = tmp_path / "gpu.csv"
    results.write_rows(path, rows)
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    kinds = md.split("## End to end or device-only")[1].split("##")[0]
    assert "- **End to end** (`e2e_ms`" in kinds and "plots `speedup_fwd.png`, `speedup_fwd_bwd.png`." in kinds
    assert "- **Device-only** (`device_ms`: the device's time alone, by cuda-graph)" in kinds
    assert "`device_speedup_fwd.png`, `device_speedup_fwd_bwd.png`, `bandwidth.png`" in kinds
    assert "The host-and-device plots (`overhead_fp32_nchw.png`) show all three" in kinds
    table = md.split("## Host- or device-bound, per shape")[1].split("##")[0]
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    lines = {row[0].strip("| "): row for row in cells}
    assert lines["6x8"][3] == "host" and lines["2x4x3x5"][3] == "device" and lines["2x3x2x2x3"][3] == "device"
    assert lines["**all**"][3] == "device 4, host 2 (shape x mode)"
    assert "not performance" not in md
    assert_png(tmp_path / "out" / "overhead_fp32_nchw.png")


def test_scaling_plot_and_gpu_csv_without_warning(tiny_csv, tmp_path):
    rows = gpu_like(results.read_rows(tiny_csv), host_bound_shapes=set())
    for row in rows:
        row["preset"] = "scaling"
    gpu_csv = tmp_path / "gpu.csv"
    results.write_rows(gpu_csv, rows)
    assert main(["report", str(gpu_csv)]) == 0
    out = tmp_path / "gpu_report"
    assert_png(out / "scaling.png")
    md = (out / "report.md").read_text()
    assert "not performance" not in md and "Device: NVIDIA H100 80GB HBM3" in md
    assert "](scaling.png)" in md


def test_csv_from_before_the_device_split(tiny_csv, tmp_path):
    """The committed H200 baseline has e2e columns only (under their old names): e2e plots, no device ones."""
    old = tmp_path / "old.csv"
    renamed = {new: old_name for old_name, new in results.RENAMED.items()}
    with open(tiny_csv, newline="") as f, open(old, "w", newline="") as g:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames if not c.startswith("device_") and c not in ("host_us", "launches")]
        writer = csv.DictWriter(g, fieldnames=[renamed.get(c, c) for c in columns])
        writer.writeheader()
        writer.writerows({renamed.get(c, c): r[c] for c in columns} for r in reader)
    assert main(["report", str(old), "--out", str(tmp_path / "out")]) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"speedup_fwd.png", "speedup_fwd_bwd.png", "report.md"} <= names
    assert not any(n.startswith(("device_", "overhead_")) for n in names)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| mode | backend | e2e vs eager | e2e vs compile | configs |" in md
    assert "predates those columns" in md and "Device time: not measured in this CSV" in md
    assert "Every timing here is **end to end**" in md


def test_commit_from_the_provenance_beside_the_csv(tiny_csv, tmp_path):
    """A run from an exported tree records no commit; provenance.json beside its CSV does."""
    rows = gpu_like(results.read_rows(tiny_csv), host_bound_shapes=set())
    for row in rows:
        row["git_commit"] = "unknown"
    results.write_rows(tmp_path / "sweep.csv", rows)
    (tmp_path / "provenance.json").write_text('{"label": "a run", "commit": "ddd3d3b"}')
    assert main(["report", str(tmp_path / "sweep.csv"), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "- Git commit: ddd3d3b (from provenance.json; the CSV has none)" in md


@pytest.fixture
def figures(monkeypatch):
    """The report's figures, laid out as save lays them out, kept open to be measured instead of written."""
    from tritonbn.perf import plots

    kept = []

    def keep(fig, path, rect=(0, 0, 1, 1), rows=None):
        if rows is not None:
            plots.figure_note(fig, rows)
        fig.tight_layout(rect=rect)
        fig.canvas.draw()
        kept.append(fig)
        return True

    monkeypatch.setattr(plots, "save", keep)
    yield kept
    plots.pyplot().close("all")


@pytest.mark.parametrize("where", ["cpu", "gpu"])
def test_plots_read(tiny_csv, tmp_path, figures, where):
    """Every panel's axes say what they show; the title and the legend sit above the panels, clear of them and of
    each other; CPU timings are watermarked inside every timing panel; a memory bar too low to see has its size
    written."""
    from tritonbn.perf import report

    rows = results.read_rows(tiny_csv)
    if where == "gpu":
        rows = gpu_like(rows, host_bound_shapes=set())
    shape = rows[0]["shape"]
    for row in rows:  # a backend that saves nothing extra for one shape: its bar must say 0, not look missing
        if row["backend"] == "tritonbn" and row["shape"] == shape:
            row["saved_extra_bytes"] = 0
    report._plots(rows, tmp_path)
    assert len(figures) >= 6
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        panels = [ax for ax in fig.axes if ax.get_visible()]
        legend = fig.legends[0].get_window_extent(renderer)
        title = fig._suptitle.get_window_extent(renderer)
        assert not legend.overlaps(title) and title.y0 > legend.y1
        for ax in panels:
            assert ax.get_title() and any(a.get_ylabel() for a in ax.get_shared_y_axes().get_siblings(ax))
            assert not ax.get_tightbbox(renderer).overlaps(legend), ax.get_title()
            watermarks = [t for t in ax.texts if t.get_text() == "CPU timings: NOT performance"]
            timing = not fig._suptitle.get_text().startswith("Memory")  # bytes are no timing: no watermark
            assert len(watermarks) == (1 if where == "cpu" and timing else 0)
        assert any(ax.get_xlabel().startswith("shape, ") for ax in panels)  # what a shape label's numbers are
    memory = next(fig for fig in figures if fig._suptitle.get_text().startswith("Memory"))
    assert "0" in [t.get_text().strip() for t in memory.axes[0].texts]
