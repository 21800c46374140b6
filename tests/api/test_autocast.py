"""Fused layers under torch.autocast behave as nn.BatchNorm does there.

Autocast lists batch norm in none of its casting lists, on CPU or CUDA: it runs in its input's dtype,
keeping float32 parameters and statistics. So a bfloat16 convolution output comes out of the fused
layer as bfloat16, and a float32 input stays float32. Tested with CPU bfloat16 autocast (the same
code path as CUDA float16/bfloat16: the kernels take a low-precision input with float32 parameters).
"""

import contextlib
import copy

import pytest
import torch
from _helpers import TOLERANCE, assert_close_to_reference
from torch import nn

import tritonbn
from tritonbn.functional import cpu_reference

PATHS = [pytest.param(contextlib.nullcontext, id="kernels"), pytest.param(cpu_reference, id="reference")]
BF16_TOLERANCE = TOLERANCE[torch.bfloat16]


class ResidualNet(nn.Module):
    """Stem conv-bn-silu, then conv-bn + the stem's output, silu: every tensor bfloat16 under autocast.

    Smooth activations: with relu, bfloat16 rounding moves values across the kink differently in the
    fused and unfused models, which changes gradients by more than rounding.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)  # a bias before BN has zero grad in training
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        identity = self.stem(x)
        return nn.functional.silu(self.bn(self.conv(identity)) + identity)


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def step(model, x, dy):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with autocast():
        y = model(x)
    y.backward(dy)
    return y, x.grad, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [pytest.param(True, id="train"), pytest.param(False, id="eval")])
def test_fused_model_matches_batch_norm_under_autocast(path, training):
    model = ResidualNet().train(training)
    fused = tritonbn.fuse(model)
    assert len(fused.tritonbn_fuse_report.fused) == 2
    x = torch.randn(2, 3, 8, 8)
    dy = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    with path():
        y_fused, dx_fused, grads_fused = step(fused, x, dy)
    y, dx, grads = step(model, x, dy)
    assert y_fused.dtype == y.dtype == torch.bfloat16
    assert dx_fused.dtype == torch.float32
    assert_close_to_reference(y_fused, y, BF16_TOLERANCE, "output")
    assert_close_to_reference(dx_fused, dx, BF16_TOLERANCE, "input grad")
    for name, grad in grads.items():
        assert grads_fused[name].dtype == torch.float32
        assert_close_to_reference(grads_fused[name], grad, BF16_TOLERANCE, f"grad of {name}")
    for key, value in model.state_dict().items():
        assert fused.state_dict()[key].dtype == value.dtype
        assert_close_to_reference(fused.state_dict()[key], value, BF16_TOLERANCE, key)


@pytest.mark.parametrize("path", PATHS)
def test_float32_input_stays_float32(path):
    layer = tritonbn.BatchNormAct2d(3, activation="gelu").eval()
    x = torch.randn(2, 3, 4, 4)
    with path():
        expected = layer(x)
        with autocast():
            y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected)


def test_same_dtypes_as_nn_batch_norm():
    """bfloat16 input with float32 parameters: output dtype as nn.BatchNorm2d's, in and out of autocast."""
    bn = nn.BatchNorm2d(3)
    fused = tritonbn.BatchNormAct2d(3, activation="identity")
    x = torch.randn(4, 3, 2, 2).bfloat16()
    for context in (contextlib.nullcontext, autocast):
        with context():
            assert fused(x).dtype == bn(x).dtype == torch.bfloat16
    torch.testing.assert_close(fused.running_var, copy.deepcopy(bn).running_var)
