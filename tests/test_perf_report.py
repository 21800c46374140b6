"""report: the plots are valid PNGs and report.md says what the numbers are, loudly when not performance."""

import pytest
import torch
from matplotlib import image

from tritonbn.perf import results
from tritonbn.perf.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0.01, "a blank image"


def test_report_files(tiny_csv, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(tiny_csv), "--out", str(out)]) == 0
    pngs = {"speedup_fwd.png", "speedup_fwd_bwd.png", "bandwidth.png", "memory.png"}
    assert {p.name for p in out.iterdir()} == pngs | {"report.md"}
    for name in pngs:
        assert_png(out / name)
    md = (out / "report.md").read_text()
    assert "**Warning: these timings are not performance.**" in md.splitlines()[2]
    assert f"torch {torch.__version__}" in md and "Device: cpu" in md
    assert "| fwd | tritonbn |" in md and "| fwd_bwd | tritonbn |" in md
    assert "## Slowest shapes" in md
    for name in pngs:
        assert f"]({name})" in md


def test_scaling_plot_and_gpu_csv_without_warning(tiny_csv, tmp_path):
    rows = results.read_rows(tiny_csv)
    for row in rows:  # as if a GPU had measured the scaling preset: only the labels matter to the report
        row.update(preset="scaling", timing="cuda-events", device="NVIDIA H100 80GB HBM3")
    gpu_csv = tmp_path / "gpu.csv"
    results.write_rows(gpu_csv, rows)
    assert main(["report", str(gpu_csv)]) == 0
    out = tmp_path / "gpu_report"
    assert_png(out / "scaling.png")
    md = (out / "report.md").read_text()
    assert "not performance" not in md and "Device: NVIDIA H100 80GB HBM3" in md
    assert "](scaling.png)" in md
