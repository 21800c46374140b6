"""BatchNormAct{1,2,3}d against nn.BatchNorm{1,2,3}d followed by the activation module, in float64."""

import pytest
import torch
from _helpers import (
    TOLERANCE,
    assert_close_to_reference,
    dtype_id,
    random_input,
    torch_activation_module,
    upstream_grad,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import tritonbn

# (our class, PyTorch's class, an input shape it accepts)
MODULE_KINDS = [
    pytest.param(tritonbn.BatchNormAct1d, nn.BatchNorm1d, (12, 70), id="1d_2D_input"),
    pytest.param(tritonbn.BatchNormAct1d, nn.BatchNorm1d, (4, 6, 33), id="1d_3D_input"),
    pytest.param(tritonbn.BatchNormAct2d, nn.BatchNorm2d, (3, 5, 11, 13), id="2d"),
    pytest.param(tritonbn.BatchNormAct3d, nn.BatchNorm3d, (2, 4, 3, 5, 7), id="3d"),
]
MOMENTA = [
    pytest.param(0.1, id="momentum0.1"),
    pytest.param(0.3, id="momentum0.3"),
    pytest.param(None, id="cumulative"),
]


def randomise_parameters(module):
    with torch.no_grad():
        if module.weight is not None:
            module.weight.uniform_(0.5, 2.0)
            module.bias.normal_()


def reference_of(module, bn_class, activation, negative_slope=0.01):
    """nn.BatchNorm with the same configuration and state, in float64, followed by the activation."""
    state = list(module.state_dict().values())
    bn = bn_class(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        dtype=torch.float64,
        device=state[0].device if state else None,
    )
    bn.load_state_dict(module.state_dict(), strict=True)
    bn.train(module.training)
    return bn, torch_activation_module(activation, negative_slope)


def assert_same_state(module, bn):
    for name, value in bn.state_dict().items():
        ours = module.state_dict()[name]
        if name == "num_batches_tracked":
            assert torch.equal(ours.cpu(), value.cpu()), f"{name}: {ours} != {value}"
        else:
            assert_close_to_reference(ours, value, TOLERANCE[ours.dtype], name)


def step_and_compare(module, bn, act, shape, device, residual=False):
    """One forward/backward through both; compares output, input/residual grads and the state after."""
    x, _, _ = random_input(shape, torch.float32, device)
    x.requires_grad_()
    r = torch.randn(shape, device=device, requires_grad=True) if residual else None
    y = module(x, r) if residual else module(x)
    x_ref = x.detach().double().requires_grad_()
    r_ref = r.detach().double().requires_grad_() if residual else None
    z_ref = bn(x_ref) + (r_ref if residual else 0)
    y_ref = act(z_ref)
    tol = TOLERANCE[torch.float32]
    assert_close_to_reference(y, y_ref, tol, "output")
    dy = upstream_grad(y, z_ref, module.activation)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close_to_reference(x.grad, x_ref.grad, tol, "grad of input")
    if residual:
        assert_close_to_reference(r.grad, r_ref.grad, tol, "grad of residual")
    if module.affine:
        assert_close_to_reference(module.weight.grad, bn.weight.grad, tol, "grad of weight")
        assert_close_to_reference(module.bias.grad, bn.bias.grad, tol, "grad of bias")
    assert_same_state(module, bn)


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize(("cls", "bn_class", "shape"), MODULE_KINDS)
def test_training_steps_then_eval_match_nn(device, cls, bn_class, shape, momentum):
    module = cls(shape[1], momentum=momentum, device=device, activation="leaky_relu", negative_slope=0.1)
    randomise_parameters(module)
    bn, act = reference_of(module, bn_class, "leaky_relu", 0.1)
    for _ in range(3):
        step_and_compare(module, bn, act, shape, device)
    assert int(module.num_batches_tracked) == 3
    module.eval()
    bn.eval()
    step_and_compare(module, bn, act, shape, device)
    assert int(module.num_batches_tracked) == 3


@pytest.mark.parametrize("activation", ["relu6", "elu", "gelu", "hardswish"])
def test_module_with_residual(device, activation):
    module = tritonbn.BatchNormAct2d(6, device=device, activation=activation)
    randomise_parameters(module)
    bn, act = reference_of(module, nn.BatchNorm2d, activation)
    step_and_compare(module, bn, act, (4, 6, 7, 5), device, residual=True)
    module.eval()
    bn.eval()
    step_and_compare(module, bn, act, (4, 6, 7, 5), device, residual=True)


def test_eval_uses_running_stats(device):
    """In eval the output of a batch must not depend on the other samples of the batch."""
    module = tritonbn.BatchNormAct2d(3, device=device, activation="identity")
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        module.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    module.eval()
    x, _, _ = random_input((4, 3, 5, 5), torch.float32, device)
    full = module(x)
    alone = module(x[:2])
    expected = (x - module.running_mean.view(1, 3, 1, 1)) / torch.sqrt(module.running_var.view(1, 3, 1, 1) + 1e-5)
    assert_close_to_reference(full, expected.double(), TOLERANCE[torch.float32], "eval output")
    assert_close_to_reference(alone, full[:2].double(), TOLERANCE[torch.float32], "eval output of a sub-batch")


def test_without_running_stats_always_uses_batch_stats(device):
    module = tritonbn.BatchNormAct2d(5, track_running_stats=False, device=device, activation="silu")
    assert module.running_mean is None and module.running_var is None and module.num_batches_tracked is None
    randomise_parameters(module)
    bn, act = reference_of(module, nn.BatchNorm2d, "silu")
    step_and_compare(module, bn, act, (3, 5, 6, 7), device)
    module.eval()
    bn.eval()
    step_and_compare(module, bn, act, (3, 5, 6, 7), device)
    assert module.running_mean is None and module.running_var is None


def test_without_affine(device):
    module = tritonbn.BatchNormAct3d(4, affine=False, device=device, activation="relu")
    assert module.weight is None and module.bias is None
    assert set(module.state_dict()) == set(nn.BatchNorm3d(4, affine=False).state_dict())
    bn, act = reference_of(module, nn.BatchNorm3d, "relu")
    step_and_compare(module, bn, act, (2, 4, 3, 4, 5), device)
    module.eval()
    bn.eval()
    step_and_compare(module, bn, act, (2, 4, 3, 4, 5), device)


def trained_nn_batch_norm(device):
    """An nn.BatchNorm2d whose every state entry differs from its initial value."""
    bn = nn.BatchNorm2d(6, momentum=0.5, device=device)
    randomise_parameters(bn)
    for _ in range(2):
        bn(random_input((3, 6, 4, 5), torch.float32, device)[0])
    return bn.eval()


def test_state_dict_from_nn_and_back(device):
    bn = trained_nn_batch_norm(device)
    module = tritonbn.BatchNormAct2d(6, device=device, activation="identity").eval()
    module.load_state_dict(bn.state_dict(), strict=True)
    for name, value in bn.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
    x = random_input((2, 6, 4, 5), torch.float32, device)[0]
    assert_close_to_reference(module(x), bn(x).double(), TOLERANCE[torch.float32], "output after loading")

    with torch.no_grad():
        module.running_mean.add_(1.0)
    back = nn.BatchNorm2d(6, device=device)
    back.load_state_dict(module.state_dict(), strict=True)
    for name, value in module.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("cls", "bn_class"),
    [
        (tritonbn.BatchNormAct1d, nn.BatchNorm1d),
        (tritonbn.BatchNormAct2d, nn.BatchNorm2d),
        (tritonbn.BatchNormAct3d, nn.BatchNorm3d),
    ],
)
def test_is_a_batch_norm_with_the_same_keys(cls, bn_class):
    module = cls(3, activation="gelu")
    assert isinstance(module, _BatchNorm)
    assert list(module.state_dict()) == list(bn_class(3).state_dict())
    assert module.activation == "gelu"
    assert "gelu" in repr(module)


def test_repr_mentions_activation_and_slope():
    text = repr(tritonbn.BatchNormAct2d(8, activation="leaky_relu", negative_slope=0.2))
    assert "leaky_relu" in text and "0.2" in text and "8" in text


def test_unknown_activation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="swish_but_wrong") as error:
        tritonbn.BatchNormAct2d(4, activation="swish_but_wrong")
    for name in tritonbn.ACTIVATIONS:
        assert name in str(error.value)


def test_reset_running_stats_and_parameters(device):
    module = tritonbn.BatchNormAct2d(4, device=device)
    randomise_parameters(module)
    module(random_input((3, 4, 5, 5), torch.float32, device)[0])
    module.reset_running_stats()
    assert torch.equal(module.running_mean, torch.zeros(4, device=device))
    assert torch.equal(module.running_var, torch.ones(4, device=device))
    assert int(module.num_batches_tracked) == 0
    module.reset_parameters()
    assert torch.equal(module.weight, torch.ones(4, device=device))
    assert torch.equal(module.bias, torch.zeros(4, device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=dtype_id)
def test_module_converted_to_dtype(device, dtype):
    module = tritonbn.BatchNormAct2d(5, device=device, activation="silu")
    randomise_parameters(module)
    module = module.to(dtype)
    assert module.weight.dtype == dtype and module.running_mean.dtype == dtype
    bn, act = reference_of(module, nn.BatchNorm2d, "silu")
    x = random_input((4, 5, 6, 6), dtype, device)[0].requires_grad_()
    y = module(x)
    assert y.dtype == dtype
    x_ref = x.detach().double().requires_grad_()
    y_ref = act(bn(x_ref))
    assert_close_to_reference(y, y_ref, TOLERANCE[dtype], "output")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert x.grad.dtype == dtype and module.weight.grad.dtype == dtype
    assert_close_to_reference(x.grad, x_ref.grad, TOLERANCE[dtype], "grad of input")
    assert_close_to_reference(module.weight.grad, bn.weight.grad, TOLERANCE[dtype], "grad of weight")
    assert_same_state(module, bn)


def test_float32_module_on_half_input(device):
    module = tritonbn.BatchNormAct2d(5, device=device, activation="gelu")
    randomise_parameters(module)
    bn, act = reference_of(module, nn.BatchNorm2d, "gelu")
    x = random_input((4, 5, 6, 6), torch.float16, device)[0].requires_grad_()
    y = module(x)
    assert y.dtype == torch.float16
    x_ref = x.detach().double().requires_grad_()
    assert_close_to_reference(y, act(bn(x_ref)), TOLERANCE[torch.float16], "output")
    y.sum().backward()
    assert x.grad.dtype == torch.float16 and module.weight.grad.dtype == torch.float32


GRADCHECK_CASES = [
    pytest.param(True, "silu", id="train-silu"),
    pytest.param(True, "elu", id="train-elu"),
    pytest.param(False, "gelu", id="eval-gelu"),
]


@pytest.mark.parametrize(("training", "activation"), GRADCHECK_CASES)
def test_gradcheck_float64(device, training, activation):
    """Numerical vs analytical Jacobian wrt input, weight, bias and residual. Smooth activations only:
    finite differences across a kink are meaningless. Fast mode compares random projections of the
    Jacobian (one directional derivative per input instead of one per element), which any wrong
    gradient still fails, and keeps this affordable under the interpreter."""
    shape = (2, 3, 3, 2)
    x = random_input(shape, torch.float64, device)[0].requires_grad_()
    weight = torch.rand(3, dtype=torch.float64, device=device).add_(0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    residual = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    running_mean = torch.randn(3, dtype=torch.float64, device=device)
    running_var = torch.rand(3, dtype=torch.float64, device=device).add_(0.5)

    def function(x, weight, bias, residual):
        # Fresh copies: a training call updates the running stats it is given.
        return tritonbn.batch_norm_act(
            x,
            running_mean.clone(),
            running_var.clone(),
            weight,
            bias,
            training,
            activation=activation,
            residual=residual,
        )

    assert torch.autograd.gradcheck(function, (x, weight, bias, residual), fast_mode=True)


def test_gradcheck_module_with_residual(device):
    module = tritonbn.BatchNormAct1d(4, device=device, dtype=torch.float64, activation="gelu")
    randomise_parameters(module)
    x = random_input((5, 4), torch.float64, device)[0].requires_grad_()
    residual = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x, residual), fast_mode=True)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_empty_batch_is_counted_and_keeps_running_statistics(device, momentum):
    """A training call on an empty batch counts it in num_batches_tracked (so momentum=None's next factor is
    1 / 3, not 1 / 2) and leaves the running statistics, as nn.BatchNorm does; its gradients are as PyTorch's."""
    fused = tritonbn.BatchNormAct2d(3, momentum=momentum, activation="identity").to(device)
    plain = nn.BatchNorm2d(3, momentum=momentum).to(device)
    for n in (4, 0, 5):
        x = torch.randn(n, 3, 2, 2, device=device) * 2 + 1
        grads = []
        for module in (fused, plain):
            module.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_()
            y = module(leaf)
            y.backward(torch.ones_like(y))
            grads.append((y, leaf.grad, module.weight.grad, module.bias.grad))
        torch.testing.assert_close(grads[0], grads[1])
        assert int(fused.num_batches_tracked) == int(plain.num_batches_tracked) == {4: 1, 0: 2, 5: 3}[n]
        torch.testing.assert_close(fused.running_mean, plain.running_mean)
        torch.testing.assert_close(fused.running_var, plain.running_var)
