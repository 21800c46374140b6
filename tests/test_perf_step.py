"""The training-step benchmark runs each backend with and without BN+activation and reports the share."""

import csv
import math

import torch

from tritonbn.perf import step
from tritonbn.perf.cli import main


def test_step_rows(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "step.csv"
        assert main(["step", "--batch", "2", "--width", "4", "--size", "5", "--blocks", "1", "--backend",
                     "eager,tritonbn", "--device", "cpu", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "identity-replacement" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["backend"] for r in rows] == ["eager", "tritonbn"]
    for r in rows:
        full, without = float(r["step_ms"]), float(r["step_without_bn_act_ms"])
        assert full > 0 and without > 0
        assert float(r["bn_act_share_pct"]) == 100 * (full - without) / full
        assert r["timing"] == "interpreter" and r["bn_layers"] == "2"
    assert float(rows[0]["step_speedup_vs_eager"]) == 1.0


def test_networks_match_in_structure():
    eager = step.build("eager", True, width=8, blocks=2)
    plain = step.build("eager", False, width=8, blocks=2)
    bn_params = sum(p.numel() for m in eager.modules() if isinstance(m, torch.nn.BatchNorm2d)
                    for p in m.parameters())
    assert sum(p.numel() for p in eager.parameters()) - bn_params == sum(p.numel() for p in plain.parameters())
    x = torch.randn(2, 8, 4, 4)
    assert eager(x).shape == plain(x).shape == x.shape
    assert not math.isnan(eager(x).sum().item())
