"""Regressions of issue 26: calls that once returned silently wrong numbers, each against float64 PyTorch.

1. a residual or an upstream gradient whose spatial dims do not collapse, with x in another layout;
2. a strided running_var beside a dense running_mean (and strided weight and bias);
3. momentum 1 and momentum=None's first batch (exact), inf running values (kept where PyTorch keeps them);
4. NaN and inf in a batch (they reach the statistics as in PyTorch);
5. the variance of a channel split across programs (as precise as one split, for |mean| / std up to 1e4).
Each runs on the path this process runs (the kernels under the interpreter, or with --reference-path the
PyTorch reference), and through SyncBatchNormAct where it applies.
"""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOLERANCE, assert_close_to_reference

import tritonbn
from tritonbn.kernels import configs


def _grads(fn, x, dy):
    x = x.detach().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


@pytest.mark.parametrize("x_format", [torch.channels_last, torch.contiguous_format], ids=["x_nhwc", "x_nchw"])
def test_residual_whose_spatial_dims_do_not_collapse(device, x_format):
    """A centre-cropped residual (spatial dims that no one stride steps through) with x in either layout."""
    x = torch.randn(2, 3, 4, 5, device=device, dtype=torch.float64).contiguous(memory_format=x_format)
    r = torch.randn(2, 3, 6, 7, device=device, dtype=torch.float64)[:, :, 1:-1, 1:-1]
    y = tritonbn.batch_norm_act(x, None, None, training=True, activation="identity", residual=r)
    assert_close_to_reference(y, F.batch_norm(x, None, None, training=True) + r, TOLERANCE[x.dtype], "output")


@pytest.mark.parametrize("activation", ["identity", "silu"])
@pytest.mark.parametrize("dy_layout", ["transposed", "cropped"])
def test_upstream_gradient_in_another_layout_than_x(device, activation, dy_layout):
    """dy transposed (a spatial transpose after the op) or cropped, x channels_last: every gradient as PyTorch's."""
    shape = (2, 3, 4, 5)
    x = torch.randn(shape, device=device, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape, device=device, dtype=torch.float64).transpose(-1, -2).contiguous().transpose(-1, -2)
    if dy_layout == "transposed":
        dy = torch.randn(2, 3, 5, 4, device=device, dtype=torch.float64).transpose(-1, -2)
    else:
        dy = torch.randn(2, 3, 6, 7, device=device, dtype=torch.float64)[:, :, 1:-1, 2:]
    leaves = [t.detach().requires_grad_() for t in (x, r)]
    y = tritonbn.batch_norm_act(leaves[0], None, None, training=True, activation=activation, residual=leaves[1])
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().requires_grad_() for t in (x, r)]
    z = F.batch_norm(ref_leaves[0], None, None, training=True) + ref_leaves[1]
    y_ref = z if activation == "identity" else F.silu(z)
    expected = torch.autograd.grad(y_ref, ref_leaves, dy)
    for name, g, e in zip(("input", "residual"), got, expected):
        assert_close_to_reference(g, e, TOLERANCE[torch.float64], f"grad of {name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_per_channel_tensors(device, training):
    """running_var a strided view beside a dense running_mean; weight and bias strided too: read through their
    strides, and in training updated there, with the memory between the elements untouched."""
    C = 5
    x = torch.randn(6, C, 3, device=device, dtype=torch.float64)
    gaps = torch.full((3 * C,), float("nan"), device=device, dtype=torch.float64)
    running_var = gaps[::3]
    running_var.copy_(torch.rand(C, dtype=torch.float64) + 0.5)
    running_mean = torch.randn(C, device=device, dtype=torch.float64)
    params = torch.randn(2, 2 * C, device=device, dtype=torch.float64)
    weight, bias = params[0, ::2], params[1, 1::2]
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    expected = F.batch_norm(x, expected_mean, expected_var, weight, bias, training, 0.3)
    y = tritonbn.batch_norm_act(x, running_mean, running_var, weight, bias, training, 0.3, activation="identity")
    assert_close_to_reference(y, expected, TOLERANCE[x.dtype], "output")
    assert_close_to_reference(running_mean, expected_mean, TOLERANCE[x.dtype], "running_mean")
    assert_close_to_reference(running_var, expected_var, TOLERANCE[x.dtype], "running_var")
    untouched = torch.ones_like(gaps, dtype=torch.bool)
    untouched[::3] = False
    assert gaps[untouched].isnan().all(), "memory between running_var's elements was written"


def _exact_mean_var(x):
    """Per-column mean and unbiased variance of a 2-D tensor, computed exactly (rationals), as float64."""
    means, variances = [], []
    for column in x.double().T.tolist():
        values = [Fraction(v) for v in column]
        mean = sum(values) / len(values)
        means.append(float(mean))
        variances.append(float(sum((v - mean) ** 2 for v in values) / (len(values) - 1)))
    return torch.tensor(means, dtype=torch.float64), torch.tensor(variances, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_momentum_one_gives_the_batch_statistics_exactly(device, dtype):
    """At momentum 1 the running statistics are the batch's, to a few roundings of the result's dtype (the old
    values, 7 and 1, are kept by 0 * old; the batch's mean 5 and std 1e-3 make any loss show)."""
    x = torch.randn(64, 3, device=device, dtype=dtype) * 1e-3 + 5.0
    running_mean, running_var = (torch.full((3,), 7.0, device=device, dtype=dtype),
                                 torch.ones(3, device=device, dtype=dtype))
    tritonbn.batch_norm_act(x, running_mean, running_var, training=True, momentum=1.0, activation="identity")
    mean, var = _exact_mean_var(x.cpu())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(running_mean.double().cpu(), mean, rtol=2 * eps, atol=0)
    torch.testing.assert_close(running_var.double().cpu(), var, rtol=8 * eps, atol=0)


@pytest.mark.parametrize("cls", [tritonbn.BatchNormAct1d, tritonbn.SyncBatchNormAct])
def test_momentum_none_first_batch_gives_the_batch_statistics(device, cls):
    """momentum=None: the first batch's factor is 1, the next ones 1 / num_batches_tracked, as _BatchNorm's."""
    module = cls(3, momentum=None, activation="identity").to(device)
    reference = torch.nn.BatchNorm1d(3, momentum=None).to(device=device, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(64, 3, device=device) * 1e-3 + step + 1  # means away from 0, so relative errors mean something
        module(x)
        reference(x.double())
        torch.testing.assert_close(module.running_mean.double(), reference.running_mean, rtol=4e-7, atol=0)
        torch.testing.assert_close(module.running_var.double(), reference.running_var, rtol=4e-6, atol=0)
    assert module.num_batches_tracked.item() == 3


def test_inf_running_value_stays_inf_below_momentum_one(device):
    x = torch.randn(8, 2, device=device)
    running_mean = torch.tensor([float("inf"), 0.0], device=device)
    running_var = torch.tensor([1.0, float("inf")], device=device)
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    F.batch_norm(x, expected_mean, expected_var, training=True, momentum=0.1)
    tritonbn.batch_norm_act(x, running_mean, running_var, training=True, momentum=0.1, activation="identity")
    torch.testing.assert_close(running_mean, expected_mean, equal_nan=True)
    torch.testing.assert_close(running_var, expected_var, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("position", [0, 7], ids=["first_row", "last_row"])
def test_nan_and_inf_reach_the_statistics_as_in_pytorch(device, bad, position):
    """A NaN gives NaN mean and variance, an inf an inf mean and NaN variance, whether it lies in the tile a
    split takes its shift from or not; the other channel is untouched."""
    x = torch.randn(8, 2, device=device)
    x[position, 0] = bad
    running = [torch.zeros(2, device=device), torch.ones(2, device=device)]
    expected = [t.clone() for t in running]
    y_ref = F.batch_norm(x, *expected, training=True)
    y = tritonbn.batch_norm_act(x, *running, training=True, activation="identity")
    for got, want, name in zip((*running, y), (*expected, y_ref), ("running_mean", "running_var", "output")):
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


def _split_configs():
    """Forced tilings that split a channel's 4 x 16 x 16 rows into 1, 4 and 12 splits, for both variants."""
    for variant in ("ticket", "merge"):
        for block_r in (1024, 256, 64):
            yield configs.KernelConfig(variant, block_r, 1, 16)


def _rms(errors):
    return torch.stack(errors).square().mean().sqrt().item()


@pytest.mark.kernels
@pytest.mark.parametrize("mean,std", [(1e4, 1.0), (-2e4, 2.0), (3.0, 1e-3)])
def test_variance_as_precise_as_one_split_across_splits(device, mean, std):
    """The batch variance (running_var at momentum 1) within 2x of PyTorch's own float32 error, whatever the
    number of splits: root-mean-square relative errors over 4 draws of 2 channels, so that one lucky draw of
    PyTorch's decides nothing (floor: one float32 rounding of the result)."""
    draws = [(torch.randn(4, 2, 16, 16, dtype=torch.float64) * std + mean).float().to(device) for _ in range(4)]
    truths = [x.double().var(dim=(0, 2, 3)) for x in draws]

    def relative_errors(run):
        errors = []
        for x, true in zip(draws, truths):
            running_var = torch.ones(2, device=device)
            run(x, torch.zeros(2, device=device), running_var)
            errors.append((running_var.double() - true) / true)
        return errors

    def pytorch(x, running_mean, running_var):
        F.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)

    def fused(x, running_mean, running_var):
        tritonbn.batch_norm_act(x, running_mean, running_var, training=True, momentum=1.0, activation="identity")

    bound = 2 * max(_rms(relative_errors(pytorch)), 2.0**-24)
    for config in _split_configs():
        with configs.override(config):
            tritonbn.plans.clear()
            error = _rms(relative_errors(fused))
        assert error <= bound, f"{config}: relative variance error {error:.2e}, PyTorch's x2 {bound:.2e}"
    tritonbn.plans.clear()
