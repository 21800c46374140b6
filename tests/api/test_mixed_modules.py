"""Fused and original batch norms that share state, called in any mix, compute what two nn.BatchNorm + ReLU
sharing that state compute: outputs, every gradient and the running statistics, in train and eval, on the
kernels and on the PyTorch reference path (the one CPU users without TRITON_INTERPRET get)."""

import contextlib

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn.modules import fused_like

ORDERS = ["original_then_fused", "fused_then_original", "fused_then_fused", "original_then_original"]


def _stack(order, bn, fused):
    first, second = order.split("_then_")
    pick = {"original": lambda x: torch.relu(bn(x)), "fused": fused}
    return pick[first], pick[second]


def _run(order, x, path, training):
    torch.manual_seed(0)  # the same state for the model under test and its all-PyTorch twin
    bn = nn.BatchNorm2d(3, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    fused = fused_like(bn, "relu", 0.01) if path != "pytorch" else None
    if path == "pytorch":  # both layers plain: what the mix must reproduce
        order = order.replace("fused", "original")
    bn.train(training)
    if fused is not None:
        fused.train(training)
    first, second = _stack(order, bn, fused)
    x = x.detach().requires_grad_()
    context = tritonbn.cpu_reference() if path == "reference" else contextlib.nullcontext()
    with context:
        y = second(first(x) - 0.5)  # the shift keeps the second layer's input off the mean
        grads = torch.autograd.grad(y, (x, bn.weight, bn.bias), torch.randn_like(y))
    return y, grads, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_fused_and_original_batch_norms_sharing_state_mix_freely(device, path, order, training):
    device = "cpu" if path == "reference" else device  # the reference path is the CPU's
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device)
    got = _run(order, x, path, training)
    expected = _run(order, x, "pytorch", training)
    for a, b in zip(got, expected, strict=True):
        if isinstance(a, tuple):
            for ga, gb in zip(a, b, strict=True):
                torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-9)
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
