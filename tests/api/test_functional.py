"""tritonbn.batch_norm_act against F.batch_norm + residual + torch activation, in float64.

Two sweeps keep this fast: activations x dtypes x residual x train/eval on one 4-D shape, and every
layout x residual x train/eval with the activations taken in turn. Shapes are small but cross the kernels'
block edges (more than 1024 values per channel, more than 64 channels).

On CUDA the sweeps are full products. Under the interpreter (CPU, seconds a case) they are pairwise: the
activation is one constexpr branch applied in float32 whatever the input dtype, and the dtype only changes
loads, stores and the arithmetic type, so every activation runs in float32 and in one other dtype (the
three others taken in turn), and every layout in float32 or bfloat16 (taken in turn).
"""

import itertools

import pytest
import torch
from _helpers import (
    DTYPES,
    TOLERANCE,
    arrange,
    assert_close_to_reference,
    check_batch_norm_act,
    dtype_id,
    make_case,
    memory_format_of,
    reference_batch_norm_act,
    upstream_grad,
)

import tritonbn

ACTIVATIONS = ("identity", "relu", "leaky_relu", "relu6", "elu", "silu", "gelu", "hardswish")
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
RESIDUAL = [pytest.param(False, id="no_residual"), pytest.param(True, id="residual")]

FULL_PRODUCT = torch.cuda.is_available()
OTHER_DTYPES = [d for d in DTYPES if d != torch.float32]
ACTIVATION_DTYPES = [
    pytest.param(activation, dtype, id=f"{activation}-{dtype_id(dtype)}")
    for i, activation in enumerate(ACTIVATIONS)
    for dtype in (DTYPES if FULL_PRODUCT else (torch.float32, OTHER_DTYPES[i % len(OTHER_DTYPES)]))
]

# (id, shape, arrangement)
LAYOUTS = [
    ("2d", (16, 70), "contiguous"),
    ("3d", (3, 6, 401), "contiguous"),
    ("3d_channels_innermost", (4, 70, 9), "channels_innermost"),
    ("4d", (3, 5, 19, 21), "contiguous"),
    ("4d_channels_last", (2, 67, 5, 7), "channels_last"),
    ("4d_sliced", (3, 5, 17, 19), "sliced"),
    ("4d_reversed_dims", (2, 6, 7, 9), "reversed_dims"),
    ("5d", (2, 3, 4, 9, 11), "contiguous"),
    ("5d_channels_last_3d", (2, 66, 3, 4, 5), "channels_last_3d"),
]
LAYOUT_DTYPES = (torch.float32, torch.bfloat16)
LAYOUT_CASES = [
    pytest.param(shape, arrangement, activation, dtype, id=f"{name}-{activation}-{dtype_id(dtype)}")
    for i, ((name, shape, arrangement), activation) in enumerate(zip(LAYOUTS, itertools.cycle(ACTIVATIONS)))
    for dtype in (LAYOUT_DTYPES if FULL_PRODUCT else LAYOUT_DTYPES[i % 2:i % 2 + 1])
]


def test_supported_activations():
    assert set(ACTIVATIONS) <= set(tritonbn.ACTIVATIONS)


@pytest.mark.kernels
def test_the_suite_runs_the_kernels(device):
    """Without this the suite would silently test the PyTorch fallback instead of the kernels: CUDA tensors
    always run them, CPU tensors under the interpreter (which conftest.py switches on without CUDA)."""
    assert tritonbn.uses_kernels(torch.randn(2, 3, device=device)) is True


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("with_residual", RESIDUAL)
@pytest.mark.parametrize(("activation", "dtype"), ACTIVATION_DTYPES)
def test_every_activation_and_dtype(device, activation, dtype, with_residual, training):
    case = make_case((3, 5, 19, 21), dtype, device, residual=with_residual)
    check_batch_norm_act(case, training=training, activation=activation, memory_format=torch.contiguous_format)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("with_residual", RESIDUAL)
@pytest.mark.parametrize(("shape", "arrangement", "activation", "dtype"), LAYOUT_CASES)
def test_every_layout(device, shape, arrangement, activation, dtype, with_residual, training):
    case = make_case(shape, dtype, device, residual=with_residual)
    case.x = arrange(case.x, arrangement)
    if with_residual:
        case.residual = arrange(case.residual, arrangement)
    check_batch_norm_act(case, training=training, activation=activation, memory_format=memory_format_of(arrangement))


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_float32_parameters_with_half_input(device, dtype, training):
    """As with cuDNN: half activations, float32 weight/bias/running stats; gradients in parameter dtype."""
    case = make_case((4, 6, 9, 10), dtype, device, param_dtype=torch.float32, residual=True)
    check_batch_norm_act(case, training=training, activation="silu")


@pytest.mark.parametrize("training", MODES)
def test_without_affine(device, training):
    case = make_case((4, 7, 6, 5), torch.float32, device, affine=False, residual=True)
    check_batch_norm_act(case, training=training, activation="relu")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_training_without_running_stats(device, activation):
    """running_mean/running_var None (track_running_stats=False): batch statistics, nothing to update."""
    case = make_case((5, 4, 8, 3), torch.float32, device)
    x = case.x.detach().requires_grad_()
    y = tritonbn.batch_norm_act(x, None, None, case.weight, case.bias, True, 0.1, 1e-5, activation=activation)
    x_ref = x.detach().double().requires_grad_()
    y_ref, z_ref = reference_batch_norm_act(
        x_ref, None, None, case.weight, case.bias, True, 0.1, 1e-5, activation, 0.01, None
    )
    assert_close_to_reference(y, y_ref, TOLERANCE[torch.float32], "output")
    dy = upstream_grad(y, z_ref, activation)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.double())
    assert_close_to_reference(dx, dx_ref, TOLERANCE[torch.float32], "grad of input")


def test_residual_in_another_layout(device):
    """A contiguous residual added to a channels_last input must still land on the right elements."""
    case = make_case((3, 6, 7, 5), torch.float32, device, residual=True)
    case.x = arrange(case.x, "channels_last")
    check_batch_norm_act(case, training=True, activation="leaky_relu", memory_format=torch.channels_last)


def test_default_negative_slope_and_custom_eps(device):
    """negative_slope defaults to 0.01 as in F.leaky_relu, and eps reaches the normalisation."""
    case = make_case((4, 3, 5, 6), torch.float64, device)
    x = case.x
    y = tritonbn.batch_norm_act(
        x,
        case.running_mean,
        case.running_var,
        case.weight,
        case.bias,
        False,
        eps=0.5,
        activation="leaky_relu",
    )
    y_ref, _ = reference_batch_norm_act(
        x,
        case.running_mean,
        case.running_var,
        case.weight,
        case.bias,
        False,
        0.1,
        0.5,
        "leaky_relu",
        0.01,
        None,
    )
    assert_close_to_reference(y, y_ref, TOLERANCE[torch.float64], "output")


@pytest.mark.parametrize("training", MODES)
def test_only_input_requires_grad(device, training):
    """Frozen affine parameters: the backward must still give the input gradient alone."""
    case = make_case((4, 5, 6, 7), torch.float32, device)
    x = case.x.detach().requires_grad_()
    y = tritonbn.batch_norm_act(
        x, case.running_mean, case.running_var, case.weight, case.bias, training, activation="hardswish"
    )
    x_ref = x.detach().double().requires_grad_()
    y_ref, z_ref = reference_batch_norm_act(
        x_ref,
        case.running_mean.double(),
        case.running_var.double(),
        case.weight,
        case.bias,
        training,
        0.1,
        1e-5,
        "hardswish",
        0.01,
        None,
    )
    dy = upstream_grad(y, z_ref, "hardswish")
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.double())
    assert_close_to_reference(dx, dx_ref, TOLERANCE[torch.float32], "grad of input")


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_reference_path(activation, dtype, training):
    """The plain PyTorch path CPU tensors take without the interpreter must give the same answers."""
    case = make_case((3, 5, 6, 7), dtype, "cpu", residual=True)
    case.x = arrange(case.x, "channels_last")
    case.residual = arrange(case.residual, "channels_last")
    with tritonbn.cpu_reference():
        assert not tritonbn.uses_kernels(case.x)
        check_batch_norm_act(case, training=training, activation=activation)
