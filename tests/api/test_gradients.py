"""Gradient cases beyond "everything requires grad": partial requirements and double backward."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_case
from torch import nn

import tritonbn
from tritonbn.validation import InputDtypeError, InputRankError, MissingRunningStatsError


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
def test_only_the_residual_needs_a_gradient(device, training, activation):
    case = make_case((3, 4, 5, 6), torch.float64, device, residual=True)
    residual = case.residual.clone().requires_grad_()
    out = tritonbn.batch_norm_act(case.x, case.running_mean.clone(), case.running_var.clone(), case.weight,
                                  case.bias, training, activation=activation, residual=residual)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, residual, grad_out)

    expected_residual = case.residual.clone().requires_grad_()
    z = F.batch_norm(case.x, case.running_mean.clone(), case.running_var.clone(), case.weight, case.bias,
                     training) + expected_residual
    expected = tritonbn.reference.activate(z, activation)
    (expected_grad,) = torch.autograd.grad(expected, expected_residual, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["silu", "leaky_relu", "identity"])
def test_double_backward(device, training, activation):
    case = make_case((3, 2, 5), torch.float64, device, residual=True)
    inputs = [t.clone().requires_grad_() for t in (case.x, case.weight, case.bias, case.residual)]

    def fused(x, weight, bias, residual):
        return tritonbn.batch_norm_act(x, case.running_mean.clone(), case.running_var.clone(), weight, bias,
                                       training, activation=activation, residual=residual)

    assert torch.autograd.gradgradcheck(fused, inputs, fast_mode=True)


def test_bias_false_matches_torch_and_loads_its_state_dict(device):
    module = tritonbn.BatchNormAct2d(3, bias=False, device=device)
    assert module.bias is None and module.weight is not None
    assert "bias" not in module.state_dict()
    x = torch.randn(4, 3, 5, 5, device=device)
    torch_bn = nn.BatchNorm2d(3, device=device)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 2.0)
        torch_bn.bias.zero_()
    state = {key: value for key, value in torch_bn.state_dict().items() if key != "bias"}
    module.load_state_dict(state, strict=True)
    torch.testing.assert_close(module(x), F.relu(torch_bn(x)), rtol=1e-4, atol=1e-5)
    module.reset_parameters()
    assert torch.equal(module.weight, torch.ones(3, device=device))


def test_error_classes_also_match_what_pytorch_raises():
    # PyTorch raises RuntimeError (NotImplementedError for integer input) for these; ours are
    # catchable as those and as the Python error that names the problem.
    with pytest.raises(NotImplementedError):
        tritonbn.batch_norm_act(torch.ones(2, 3, dtype=torch.long), None, None, training=True)
    with pytest.raises(InputDtypeError):
        tritonbn.batch_norm_act(torch.ones(2, 3, dtype=torch.long), None, None, training=True)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        tritonbn.batch_norm_act(torch.randn(5), None, None, training=True)
    with pytest.raises(InputRankError):
        tritonbn.batch_norm_act(torch.randn(5), None, None, training=True)
    with pytest.raises(RuntimeError, match="must be given when training=False"):
        tritonbn.batch_norm_act(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(MissingRunningStatsError):
        tritonbn.batch_norm_act(torch.randn(4, 3), None, None, training=False)
