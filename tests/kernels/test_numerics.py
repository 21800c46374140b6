"""Numerically hard inputs: a large mean, extents spanning many blocks, determinism, empty batches, NaN."""

import pytest
import torch
from _helpers import (
    TOLERANCE,
    arrange,
    assert_close_to_reference,
    channel_view,
    check_batch_norm_act,
    make_case,
    reference_batch_norm_act,
)

import tritonbn

# Many blocks along the reduction (10240 and 4096 values per channel), few channels, so the reduction
# must be split across programs and the partial results combined.
MANY_BLOCKS = [
    pytest.param((2, 2, 64, 80), "contiguous", id="4d_2x2x64x80"),
    pytest.param((2, 2, 64, 80), "channels_last", id="4d_2x2x64x80_channels_last"),
    pytest.param((4096, 3), "contiguous", id="2d_4096x3"),
    pytest.param((3, 2, 3001), "contiguous", id="3d_3x2x3001"),
]


@pytest.mark.parametrize("training", [pytest.param(True, id="train"), pytest.param(False, id="eval")])
@pytest.mark.parametrize(("shape", "arrangement"), MANY_BLOCKS)
def test_extents_spanning_many_blocks(device, shape, arrangement, training):
    case = make_case(shape, torch.float32, device, residual=True)
    case.x = arrange(case.x, arrangement)
    case.residual = arrange(case.residual, arrangement)
    check_batch_norm_act(case, training=training, activation="relu")


def test_large_mean_float32(device):
    """Channel 1 has mean 1e4 and std 1. E[x^2] - E[x]^2 in float32 loses the variance entirely (the
    squares are ~1e8, where float32 steps by 8); shifted or Welford statistics keep it to ~1e-6."""
    shape = (4, 3, 24, 24)
    x = torch.randn(shape, dtype=torch.float64)
    x[:, 1] += 1e4
    x = x.to(device=device, dtype=torch.float32).requires_grad_()
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    weight = torch.tensor([1.0, 1.5, -0.5], device=device, requires_grad=True)
    bias = torch.tensor([0.0, 0.5, 0.2], device=device, requires_grad=True)

    # momentum 1 makes the running stats exactly the batch statistics.
    y = tritonbn.batch_norm_act(x, running_mean, running_var, weight, bias, True, 1.0, activation="identity")

    x64 = x.detach().double()
    dims = [0, 2, 3]
    torch.testing.assert_close(running_mean.double().cpu(), x64.mean(dims).cpu(), rtol=0, atol=1e-2)
    torch.testing.assert_close(running_var.double().cpu(), x64.var(dims).cpu(), rtol=1e-2, atol=0)
    y_ref = (x64 - channel_view(x64.mean(dims), 4)) / torch.sqrt(channel_view(x64.var(dims, correction=0), 4) + 1e-5)
    y_ref = y_ref * channel_view(weight.detach().double(), 4) + channel_view(bias.detach().double(), 4)
    torch.testing.assert_close(y.double().cpu(), y_ref.cpu(), rtol=0, atol=3e-2)

    x_ref = x64.clone().requires_grad_()
    w_ref, b_ref = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y_ref, _ = reference_batch_norm_act(x_ref, None, None, w_ref, b_ref, True, 1.0, 1e-5, "identity", 0.0, None)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, bias), dy)
    ref_grads = torch.autograd.grad(y_ref, (x_ref, w_ref, b_ref), dy.double())
    for name, grad, ref_grad in zip(("input", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close_to_reference(grad, ref_grad, 5e-2, f"grad of {name}")


def test_float16_with_large_values(device):
    """Means up to 3e4 with spreads up to 3e3: sums and squares overflow float16, not float32."""
    shape = (4, 4, 24, 24)
    mean = torch.tensor([3e4, -2e4, 5e3, 0.0], dtype=torch.float64)
    spread = torch.tensor([3e3, 1e3, 5e2, 2e3], dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * channel_view(spread, 4) + channel_view(mean, 4)
    case = make_case(shape, torch.float16, device, param_dtype=torch.float32)
    case.x = x.to(device=device, dtype=torch.float16)
    assert case.x.isfinite().all()
    case.running_mean = (mean + 0.1 * spread * torch.randn(4, dtype=torch.float64)).float().to(device)
    case.running_var = (spread**2 * (torch.rand(4, dtype=torch.float64) + 0.5)).float().to(device)
    for training in (True, False):
        y = check_batch_norm_act(case, training=training, activation="gelu")
        assert y.isfinite().all()


@pytest.mark.parametrize("shape", [(2, 2, 64, 80), (4096, 3)], ids=["4d_2x2x64x80", "2d_4096x3"])
def test_deterministic(device, shape):
    """Same inputs, bitwise same outputs, gradients and running stats, three times over."""
    case = make_case(shape, torch.float32, device, residual=True)
    dy = torch.randn_like(case.x)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (case.x, case.weight, case.bias, case.residual)]
        running_mean, running_var = case.running_mean.clone(), case.running_var.clone()
        y = tritonbn.batch_norm_act(
            leaves[0],
            running_mean,
            running_var,
            leaves[1],
            leaves[2],
            True,
            activation="silu",
            residual=leaves[3],
        )
        return [y, running_mean, running_var, *torch.autograd.grad(y, leaves, dy)]

    first = run()
    for _ in range(2):
        for name, a, b in zip(
            ["output", "running_mean", "running_var", "dx", "dweight", "dbias", "dresidual"],
            first,
            run(),
            strict=True,
        ):
            assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (3, 4, 0, 5)], ids=["empty_batch", "empty_spatial"])
def test_zero_size_input(device, shape):
    module = tritonbn.BatchNormAct2d(4, device=device)
    x = torch.randn(shape, device=device, requires_grad=True)
    y = module(x)
    assert y.shape == shape
    assert module.running_mean.isfinite().all() and module.running_var.isfinite().all()
    y.sum().backward()
    assert x.grad.shape == shape
    assert module.weight.grad.isfinite().all() and module.bias.grad.isfinite().all()


@pytest.mark.parametrize("training", [pytest.param(True, id="train"), pytest.param(False, id="eval")])
def test_nan_stays_in_its_channel(device, training):
    case = make_case((4, 3, 6, 6), torch.float32, device)
    case.x[1, 1, 2, 3] = float("nan")
    running_mean, running_var = case.running_mean.clone(), case.running_var.clone()
    y = tritonbn.batch_norm_act(
        case.x, running_mean, running_var, case.weight, case.bias, training, activation="identity"
    )
    y_ref, _ = reference_batch_norm_act(
        case.x,
        case.running_mean.double(),
        case.running_var.double(),
        case.weight,
        case.bias,
        training,
        0.1,
        1e-5,
        "identity",
        0.0,
        None,
    )
    others = [0, 2]
    assert_close_to_reference(y[:, others], y_ref[:, others], TOLERANCE[torch.float32], "other channels")
    if training:
        assert y[:, 1].isnan().all(), "batch statistics of the NaN channel are NaN, so is all its output"
        assert running_mean[1].isnan() and running_mean[others].isfinite().all()
        assert running_var[others].isfinite().all()
    else:
        assert y[1, 1, 2, 3].isnan() and y.isnan().sum() == 1, "eval output is NaN at the NaN only"


def test_offsets_past_int32_switch_the_kernels_to_int64_indices():
    from tritonbn.kernels.plan import needs_int64

    assert needs_int64((2**31 + 8, 1), [(1, 1, 1)])  # rows past int32
    assert needs_int64((2, 4, 2**30), [(4 * 2**30, 2**30, 1)])  # offsets past int32
    assert needs_int64((3, 2, 5), [(10, 5, 1), (1, 3, 2**29)])  # any tensor's
    assert not needs_int64((64, 256, 56 * 56), [(256 * 56 * 56, 1, 256)])


def test_int64_indices_give_the_same_results(device, monkeypatch):
    from tritonbn import plans
    from tritonbn.kernels import backward, forward

    x = torch.randn(3, 4, 9, 11, dtype=torch.float64, device=device, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64, device=device, requires_grad=True)

    def run():
        out = tritonbn.batch_norm_act(x, None, None, weight, None, True, activation="silu", residual=residual)
        return (out, *torch.autograd.grad(out, (x, weight, residual), torch.ones_like(out)))

    expected = run()
    for module in (forward, backward):
        monkeypatch.setattr(module, "needs_int64", lambda *args: True)
    monkeypatch.setattr(plans, "PLANS", {})  # plan anew, with int64 offsets
    for got, want in zip(run(), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
