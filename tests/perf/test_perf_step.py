"""The training-step benchmark: every variant gets a row (run, or skipped with the reason), BN+activation's
share comes from the same network without them, and the stand-in ResNet-50 is ResNet-50."""

import csv
import importlib.util
import math

import pytest
import torch
from png_check import assert_png
from torch.nn.modules.batchnorm import _BatchNorm

from tritonbn import backend as tritonbn_backend
from tritonbn.perf import models, step
from tritonbn.perf.cli import main
from tritonbn.perf.shapes import resnet50 as resnet50_bn_shapes


def test_toy_step_end_to_end_on_a_cpu(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path / "step.csv"
    try:
        assert main(["step", "--device", "cpu", "--precision", "fp32-nchw", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "identity-replacement" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == list(step.VARIANTS)
    for name in ("compile", "compile-fused"):
        assert rows[name]["status"].startswith("skipped: torch.compile is not timed on a CPU")
    for name in ("cudagraphs", "cudagraphs-fused"):
        assert rows[name]["status"] == "skipped: CUDA graphs (torch.compile mode='reduce-overhead') need a CUDA device"
        assert rows[name]["step_ms"] == ""
    label = "interpreter" if tritonbn_backend.uses_kernels(torch.empty(0)) else "cpu-reference"
    eager, fused = rows["eager"], rows["fused"]
    assert (eager["timing"], fused["timing"]) == ("cpu-pytorch", label)
    for r in (eager, fused):
        assert r["status"] == "ok" and r["model"] == "toy (tritonbn.perf.models)"
        full, without = float(r["step_ms"]), float(r["without_bn_act_ms"])
        assert full > 0 and without > 0
        assert float(r["bn_act_ms"]) == full - without
        assert float(r["bn_act_share_pct"]) == 100 * (full - without) / full
        assert r["bn_layers"] == "5"  # the stem's, and bn1-bn3 and the downsample's in the one block
    # fusing leaves nothing to time in the network without batch norm: both share its time
    assert eager["without_bn_act_ms"] == fused["without_bn_act_ms"]
    assert eager["fused_layers"] == "0" and fused["fused_layers"] == "4"  # the downsample's BN stays unfused
    assert float(eager["speedup_vs_eager"]) == 1.0
    assert float(fused["speedup_vs_eager"]) == float(eager["step_ms"]) / float(fused["step_ms"])
    assert_png(out.with_suffix(".png"))


def test_network_without_bn_act_keeps_everything_else():
    model, _ = models.build(models.NETWORKS["toy"])
    bn_params = sum(p.numel() for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters())
    plain = models.without_bn_act(models.build(models.NETWORKS["toy"])[0])
    assert models.batch_norm_layers(plain) == 0
    assert not any(isinstance(m, torch.nn.ReLU) for m in plain.modules())
    assert sum(p.numel() for p in model.parameters()) - bn_params == sum(p.numel() for p in plain.parameters())
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == plain(x).shape == (2, 10)
    assert not math.isnan(plain(x).sum().item())


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="torchvision is installed: the step uses its ResNet-50")
def test_stand_in_is_resnet50():
    model, source = models.build(models.NETWORKS["resnet50"])
    assert source == "resnet50 (tritonbn.perf.models)"
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50()
    seen = []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 224, 224))
    expected = {case.shape: case.layers for case in resnet50_bn_shapes(1)}
    assert {shape: seen.count(shape) for shape in seen} == expected
