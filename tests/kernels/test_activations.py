"""The activation jit functions on their own, against PyTorch's ops and their autograd.

A tiny kernel applies ``activation_forward`` and ``activation_backward`` elementwise, in float32 and in
float64 (the kernels' two compute dtypes), under the interpreter on a CPU or compiled on CUDA.

PyTorch's references are computed on the CPU, one element at a time:
  - on the CPU because PyTorch's CUDA hardswish multiplies by 1/6 rounded to float32 even for float64
    (3e-8 relative, 3.5e-7 at z = 12), where its CPU divides by 6 in float64;
  - one element at a time because PyTorch's CPU kernels then run their scalar loop, which evaluates the
    same formula as its CUDA kernels. The vectorised CPU loops differ at NaN (relu6's gradient is 0,
    elu's and hardswish's NaN, where CUDA and the scalar loop pass dy through), the float32 one gives
    gelu(+inf) = NaN where the others give +inf, and before pytorch/pytorch#143899 the vectorised
    hardswish gradient took other sides of -3 and 3 than the scalar one.
"""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from _helpers import TORCH_ACTIVATIONS, dtype_id

from tritonbn.activations import KERNEL_IDS
from tritonbn.kernels.activations import activation_backward, activation_forward

ACTIVATIONS = tuple(KERNEL_IDS)
DTYPES = (torch.float32, torch.float64)
# Slopes exact in float32: the test kernel takes the slope as a float32 argument when compiled (the real
# kernels pass it as a float32 head and tail), so torch must see the same value. The negative one makes
# leaky_relu's zeros take their sign from the product z * slope.
SLOPES = {"leaky_relu": (float(np.float32(0.2)), -0.5)}
KINKS = (0.0, 3.0, -3.0, 6.0)  # relu, leaky_relu, elu: 0; relu6: 0, 6; hardswish: -3, 3
BLOCK = 128

# Under the interpreter numpy warns about the inf and NaN arithmetic these tests exist to exercise.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@triton.jit
def _activation_kernel(z_ptr, dy_ptr, y_ptr, dz_ptr, n, negative_slope, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0)
    slope = tl.zeros_like(z) + negative_slope  # in the compute dtype, as the real kernels pass it
    tl.store(y_ptr + offsets, activation_forward(z, slope, ACTIVATION), mask=mask)
    tl.store(dz_ptr + offsets, activation_backward(dy, z, slope, ACTIVATION), mask=mask)


def triton_activation(name, z, dy, negative_slope, device):
    """(act(z), dy * act'(z)) from the jit functions, on `device`, returned on the CPU."""
    z, dy = z.to(device), dy.to(device)
    y, dz = torch.empty_like(z), torch.empty_like(z)
    grid = (triton.cdiv(z.numel(), BLOCK),)
    _activation_kernel[grid](z, dy, y, dz, z.numel(), negative_slope, ACTIVATION=KERNEL_IDS[name], BLOCK=BLOCK)
    return y.cpu(), dz.cpu()


def torch_activation(name, z, dy, negative_slope):
    """(act(z), its autograd gradient for upstream dy) from PyTorch on the CPU, in z's dtype, one element at
    a time (see the module's docstring)."""
    ys, dzs = [], []
    for zi, dyi in zip(z.cpu(), dy.cpu()):
        zi = zi.reshape(1).requires_grad_(True)
        yi = TORCH_ACTIVATIONS[name](zi, negative_slope)
        (dzi,) = torch.autograd.grad(yi, zi, dyi.reshape(1))
        ys.append(yi.detach())
        dzs.append(dzi)
    return torch.cat(ys), torch.cat(dzs)


def cases():
    """(activation, negative_slope, dtype) for every activation, both slopes of leaky_relu, both dtypes."""
    return [
        pytest.param(name, slope, dtype, id=f"{name}{f'-slope{slope:g}' if name in SLOPES else ''}-{dtype_id(dtype)}")
        for name in ACTIVATIONS
        for slope in SLOPES.get(name, (0.0,))
        for dtype in DTYPES
    ]


def neighbours(values, dtype):
    """The values and their nearest representable neighbours on both sides, in `dtype`."""
    t = torch.tensor(values, dtype=dtype)
    inf = torch.full_like(t, math.inf)
    return torch.cat([t, torch.nextafter(t, inf), torch.nextafter(t, -inf)])


def assert_same_floats(actual, expected, rtol, atol, what):
    """assert_close, plus NaN in exactly the same places and zeros of the same sign."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN at other places"
    both_zero = (actual == 0) & (expected == 0)
    assert torch.equal(actual[both_zero].signbit(), expected[both_zero].signbit()), f"{what}: zeros of other sign"


@pytest.mark.parametrize(("name", "negative_slope", "dtype"), cases())
def test_special_values_follow_pytorch_rule(device, name, negative_slope, dtype):
    """At NaN, ±inf, ±0 and exactly at (and next to) every kink, with NaN and inf upstream gradients too,
    values and gradients equal PyTorch's: same NaN places, same side of each kink, same signs of zeros."""
    z_values = torch.cat(
        [
            torch.tensor(
                [math.nan, math.inf, -math.inf, -0.0, 1.0, -1.0, 2.5, -2.5, 10.0, -10.0, 1e-30, -1e-30], dtype=dtype
            ),
            neighbours(KINKS, dtype),
        ]
    )
    dy_values = torch.tensor([1.5, -0.75, math.inf, math.nan], dtype=dtype)
    z = z_values.repeat_interleave(len(dy_values))
    dy = dy_values.repeat(len(z_values))

    y, dz = triton_activation(name, z, dy, negative_slope, device)
    y_ref, dz_ref = torch_activation(name, z, dy, negative_slope)

    # Transcendental values (silu, gelu, elu away from the kinks) carry the last-bit differences of exp and
    # erf implementations (CUDA's float32 exp is approximate); everything else is exact.
    rtol, atol = (1e-12, 1e-15) if dtype == torch.float64 else (2e-5, 1e-6)
    assert_same_floats(y, y_ref, rtol, atol, f"{name} forward at z={z.tolist()}")
    assert_same_floats(dz, dz_ref, rtol, atol, f"{name} backward at z={z.tolist()}, dy={dy.tolist()}")


def random_pre_activations(dtype):
    """Ordinary, large and tiny |z|, z where exp(z) is subnormal, values near every kink, and the kinks."""
    big = 700.0 if dtype == torch.float64 else 80.0  # exp(±big) stays finite
    subnormal_exp = torch.linspace(-750, -705, 46) if dtype == torch.float64 else torch.linspace(-106, -86, 41)
    tiny = torch.logspace(-30, -1, 30, dtype=torch.float64)
    near_kinks = torch.tensor(KINKS, dtype=torch.float64)[:, None] + torch.tensor([-1e-3, -1e-9, 1e-9, 1e-3])
    z = torch.cat(
        [
            torch.randn(300, dtype=torch.float64) * 3,
            torch.randn(100, dtype=torch.float64) * 30,
            torch.tensor([big, -big, 1e4, -1e4], dtype=torch.float64),
            subnormal_exp.double(),
            tiny,
            -tiny,
            near_kinks.flatten(),
        ]
    ).to(dtype)
    return torch.cat([z, neighbours(KINKS, dtype)])


# Absolute slack on top of the relative tolerance, where PyTorch's own formula cancels: gelu's 1 + erf(z/√2)
# in the negative tail and gelu' / silu' near their zero crossings lose digits in PyTorch too, so there
# the last-bit differences of erf and exp implementations show. Elsewhere the comparison is relative down
# to the smallest normal number (subnormal results, exp(z) for z < -87 in float32, carry few digits), so
# tiny values such as elu(-1e-20) must be right to the last digits.
ATOL = {
    torch.float64: {"gelu": 1e-14, "silu": 1e-15},
    torch.float32: {"gelu": 1e-6, "silu": 1e-6},
}
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}  # float32: CUDA's exp is approximate (ex2.approx)


@pytest.mark.parametrize(("name", "negative_slope", "dtype"), cases())
def test_random_values_match_pytorch(device, name, negative_slope, dtype):
    """Forward and backward against PyTorch in the same dtype, to 1e-12 relative in float64 (every
    constant and operation of the float64 path must be float64), including exactly at the kinks."""
    z = random_pre_activations(dtype)
    dy = torch.randn(z.shape, dtype=torch.float64).to(dtype)

    y, dz = triton_activation(name, z, dy, negative_slope, device)
    y_ref, dz_ref = torch_activation(name, z, dy, negative_slope)

    rtol, atol = RTOL[dtype], ATOL[dtype].get(name, torch.finfo(dtype).tiny)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, msg=lambda m: f"{name} forward: {m}")
    torch.testing.assert_close(dz, dz_ref, rtol=rtol, atol=atol, msg=lambda m: f"{name} backward: {m}")
