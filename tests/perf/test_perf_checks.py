"""The sweep's correctness check against float64: a ReLU mask flip at |z| ~ 0 passes, a real error fails."""

import math

import pytest
import torch
import torch.nn.functional as F

from tritonbn.perf import checks, sweep
from tritonbn.perf.backends import Backend, eager_batch_norm_act
from tritonbn.perf.shapes import ShapeCase


class FlipOneMask(torch.autograd.Function):
    """ReLU whose backward takes the other side of the kink at the element nearest it, as float32 does
    where the exact pre-activation is within rounding of 0. The forward is ReLU's: y moves by |z| ~ 0."""

    @staticmethod
    def forward(ctx, z):
        mask = (z > 0).flatten()
        index = z.detach().abs().argmin()
        mask[index] = ~mask[index]
        ctx.save_for_backward(mask.view(z.shape))
        return z.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask


def flip_one_mask(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                  eps=1e-5, *, activation="relu", negative_slope=0.01, residual=None):
    return FlipOneMask.apply(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))


def wrong_scale_on_one_channel(input, running_mean, running_var, weight=None, bias=None, training=False,
                               momentum=0.1, eps=1e-5, **kwargs):
    scale = torch.ones_like(weight)
    scale[0] = 1.2
    return eager_batch_norm_act(input, running_mean, running_var, weight * scale, bias, training, momentum, eps,
                                **kwargs)


@pytest.mark.parametrize("mode", ["bwd", "fwd_bwd"])
def test_sweep_passes_a_mask_flip_and_fails_a_wrong_channel(mode, tmp_path):
    # Large enough that a flip is one element among many (the float32 bounds assume realistic sizes).
    cfgs = sweep.configs([("t", ShapeCase((64, 4, 32, 32)))], ["fp32"], ["nchw"], ["relu"], [False], [mode])
    backends = [Backend("flip", flip_one_mask), Backend("wrong", wrong_scale_on_one_channel)]
    rows = {r["backend"]: r for r in sweep.run(cfgs, backends, {}, torch.device("cpu"), str(tmp_path / "r.csv"),
                                                progress=False)}
    assert rows["flip"]["status"] == "ok" and rows["flip"]["ok"], rows["flip"]["status"]
    assert rows["flip"]["err_rel_l2"] <= checks.REL_L2["fp32"]
    assert rows["wrong"]["status"].startswith("mismatch: ") and not rows["wrong"]["ok"]


def activation_outputs(dtype, shape=(16, 8, 16, 16), seed=0):
    """(float64 reference outputs of BN + ReLU fwd/bwd, the same rounded to `dtype` as a backend's)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
    dy = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = (torch.rand(shape[1], generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(shape[1], generator=generator, dtype=torch.float64).requires_grad_()
    stats = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    y = F.relu(F.batch_norm(x, *stats, weight, bias, True))
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), dy)
    ref = {"y": y.detach(), "dx": dx, "dweight": dweight, "dbias": dbias, "running_mean": stats[0],
           "running_var": stats[1]}
    rounded = {name: t.to(dtype) if t.dim() > 1 else t.float() for name, t in ref.items()}
    return rounded, ref, dy


@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "fp32"), (torch.bfloat16, "bf16"),
                                             (torch.float16, "fp16")])
def test_rounding_passes(dtype, name):
    got, ref, _ = activation_outputs(dtype)
    verdict = checks.compare(got, ref, name)
    assert verdict.ok and verdict.outliers == 0, verdict
    assert 0 < verdict.rel_l2 <= checks.REL_L2[name]


def flip(got, element=(3, 5, 7, 9), channels_too=True):
    """What a flipped mask does: dx at one element takes the other side; that channel's sums move with it."""
    got = dict(got)
    got["dx"] = got["dx"].clone()
    got["dx"][element] += 4 * got["dx"].abs().max()
    if channels_too:
        got["dbias"] = got["dbias"].clone()
        got["dbias"][element[1]] += 30.0
    return got


@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_an_isolated_flip_passes(dtype, name):
    got, ref, _ = activation_outputs(dtype)
    verdict = checks.compare(flip(got), ref, name)
    assert verdict.ok, verdict
    assert verdict.outliers == 2  # the dx element and its channel's dbias


def test_per_channel_gradients_may_move_only_where_dx_flipped():
    got, ref, _ = activation_outputs(torch.float32)
    moved = flip(got, channels_too=False)
    moved["dbias"] = moved["dbias"].clone()
    moved["dbias"][6] += 3.0  # channel 6; the flip is in channel 5
    verdict = checks.compare(moved, ref, "fp32")
    assert not verdict.ok and verdict.problem.startswith("dbias: 1 of 8")


@pytest.mark.parametrize(("channels", "ok"), [((1, 4, 6), True), ((2, 2, 2), False), ((2,) * 40, False)])
def test_outliers_must_be_few_and_isolated(channels, ok):
    # 524288 elements allow 1 + 5 outliers; a wrong channel, or a corner of one, is not a few flips
    got, ref, _ = activation_outputs(torch.float32, shape=(64, 8, 32, 32))
    got["dx"] = got["dx"].clone()
    for i, channel in enumerate(channels):
        got["dx"][i, channel, 3, 3] += 4 * got["dx"].abs().max()
    verdict = checks.compare(got, ref, "fp32")
    assert verdict.ok == ok, verdict
    assert ok or verdict.problem.startswith(f"dx: {len(channels)} elements off")


def test_wrong_scale_on_one_channel_fails_even_in_bf16():
    got, ref, _ = activation_outputs(torch.bfloat16, shape=(16, 64, 8, 8))
    got["y"] = got["y"].clone()
    got["y"][:, 0] *= 1.2
    verdict = checks.compare(got, ref, "bf16")
    assert not verdict.ok and verdict.problem.startswith("y:")


def test_one_wrong_running_statistic_fails():
    got, ref, _ = activation_outputs(torch.float32)
    got["running_var"] = got["running_var"].clone()
    got["running_var"][7] *= 1.01
    verdict = checks.compare(got, ref, "fp32")
    assert not verdict.ok and verdict.problem == "running_var: 1 of 8 elements off"


def test_a_thin_error_everywhere_fails_the_l2_bound():
    got, ref, _ = activation_outputs(torch.float32)
    # every element off by a bit more than REL_L2 (relative), well inside the per-element tolerance
    got["y"] = (ref["y"] * (1 + 3 * checks.REL_L2["fp32"])).float()
    verdict = checks.compare(got, ref, "fp32")
    assert not verdict.ok and verdict.problem.startswith("y: relative L2 error")
    assert verdict.rel_l2 == pytest.approx(3 * checks.REL_L2["fp32"], rel=0.01)


def test_nan_and_wrong_shape_fail():
    got, ref, _ = activation_outputs(torch.float32)
    got["dx"] = got["dx"].clone()
    got["dx"][0, 0, 0, 0] = math.nan
    assert checks.compare(got, ref, "fp32").problem == "dx: not finite"
    got, ref, _ = activation_outputs(torch.float32)
    got["y"] = got["y"][:1]
    assert checks.compare(got, ref, "fp32").problem.startswith("y: shape (1, 8, 16, 16)")
