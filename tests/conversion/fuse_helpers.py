"""Models and checks shared by the tritonbn.fuse / unfuse tests (tests/conversion/test_fuse*.py)."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it, so fuse falls back to FusedSequential."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.3),
        )
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return F.relu(self.bn(x))


def randomize_batch_norms(model):
    """Non-trivial parameters and running statistics, so that a lost or swapped value shows."""
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            if module.weight is not None:
                module.weight.uniform_(0.5, 2.0)
            if module.bias is not None:
                module.bias.normal_()
            if module.track_running_stats:
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(3)
    return model


def make(model_class):
    return randomize_batch_norms(model_class()).double()


def run_step(model, x, dy=None):
    """Forward and backward of one step: (output, upstream grad, input grad, parameter grads by name)."""
    x = x.clone().requires_grad_()
    y = model(x)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    return y.detach(), dy, x.grad, {name: p.grad for name, p in model.named_parameters()}


def assert_same_state(actual, expected):
    actual, expected = actual.state_dict(), expected.state_dict()
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=lambda m, k=key: f"{k}: {m}")


def _close(actual, expected, rtol, scale, msg=None):
    """torch's float64 tolerances; with ``rtol``, within ``rtol`` of each value or of ``scale``."""
    if rtol is None:
        torch.testing.assert_close(actual, expected, msg=msg)
    else:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=msg)


def assert_same_computation(original, converted, input_shape, training, rtol=None):
    """Two steps of both models on the same fresh inputs: outputs, input and parameter gradients, then the
    state.  ``rtol`` is for deep models, whose layers amplify float64 rounding: each value within ``rtol``
    of itself or of the largest value of its kind (output, input gradient, parameter gradients: one that is
    zero in exact arithmetic, like the bias before a training-mode batch norm, holds rounding only)."""
    original.train(training)
    converted.train(training)
    for _ in range(2):  # the second step sees the running statistics the first one left
        x = torch.randn(input_shape, dtype=torch.float64) * 1.5 + 0.5
        original.zero_grad(set_to_none=True)
        converted.zero_grad(set_to_none=True)
        y, dy, dx, grads = run_step(original, x)
        y_c, _, dx_c, grads_c = run_step(converted, x, dy)
        _close(y_c, y, rtol, y.abs().max())
        _close(dx_c, dx, rtol, dx.abs().max())
        assert sorted(grads_c) == sorted(grads)
        scale = max((grad.abs().max() for grad in grads.values() if grad is not None), default=0)
        for name, grad in grads.items():
            if grad is None:
                assert grads_c[name] is None, name
            else:
                _close(grads_c[name], grad, rtol, scale, msg=lambda m, n=name: f"grad of {n}: {m}")
    assert_same_state(converted, original)


def fused_layers(model):
    return {layer.name: (layer.activation, layer.negative_slope, layer.residual)
            for layer in model.tritonbn_fuse_report.fused}


def saved(model):
    """``model`` pickled with torch.save, ready for torch.load."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def double_output(module, args, output):
    return output * 2
