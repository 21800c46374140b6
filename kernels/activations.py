"""Activations fused into the batch-norm kernels, chosen at compile time by a ``tl.constexpr`` id.

Each forward matches PyTorch's op, NaN propagation included, and each derivative matches the rule of
PyTorch's backward for that op (which side of a kink gets the gradient), so that fused and unfused
models produce the same gradients.
"""

import triton
import triton.language as tl

# Ids as ``tl.constexpr`` so the jit functions can read them; ``ACTIVATION_IDS`` maps names to them.
IDENTITY = tl.constexpr(0)
RELU = tl.constexpr(1)
LEAKY_RELU = tl.constexpr(2)
RELU6 = tl.constexpr(3)
ELU = tl.constexpr(4)
SILU = tl.constexpr(5)
GELU = tl.constexpr(6)
HARDSWISH = tl.constexpr(7)

ACTIVATION_IDS = {
    "identity": IDENTITY.value,
    "relu": RELU.value,
    "leaky_relu": LEAKY_RELU.value,
    "relu6": RELU6.value,
    "elu": ELU.value,
    "silu": SILU.value,
    "gelu": GELU.value,
    "hardswish": HARDSWISH.value,
}


@triton.jit
def _times_sqrt_half(z):
    # Triton makes float literals float32; a float32 head plus a tail keeps float64 inputs exact.
    return z * 0.7071067690849304 + z * 1.2101617041793133e-08


@triton.jit
def _times_inv_sqrt_2pi(z):
    return z * 0.3989422917366028 - z * 1.1335170080339907e-08


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def activation_forward(z, negative_slope, ACTIVATION: tl.constexpr):
    """act(z); comparisons are written so that a NaN ``z`` comes out as NaN, as in PyTorch."""
    if ACTIVATION == RELU:
        z = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == LEAKY_RELU:
        z = tl.where(z < 0, z * negative_slope, z)
    elif ACTIVATION == RELU6:
        z = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACTIVATION == ELU:
        z = tl.where(z > 0, z, tl.exp(z) - 1.0)
    elif ACTIVATION == SILU:
        z = z * _sigmoid(z)
    elif ACTIVATION == GELU:
        z = 0.5 * z * (1.0 + tl.math.erf(_times_sqrt_half(z)))
    elif ACTIVATION == HARDSWISH:
        z = z * tl.where(z < -3.0, 0.0, tl.where(z > 3.0, 6.0, z + 3.0)) / 6.0
    return z


@triton.jit
def activation_backward(dy, z, negative_slope, ACTIVATION: tl.constexpr):
    """dy * act'(z), with the value at each kink taken from PyTorch's backward of the same op."""
    if ACTIVATION == RELU:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACTIVATION == LEAKY_RELU:
        dy = tl.where(z > 0, dy, dy * negative_slope)
    elif ACTIVATION == RELU6:
        dy = tl.where((z > 0) & (z < 6.0), dy, 0.0)
    elif ACTIVATION == ELU:
        dy = tl.where(z > 0, dy, dy * tl.exp(z))
    elif ACTIVATION == SILU:
        sig = _sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(_times_sqrt_half(z)))
        pdf = _times_inv_sqrt_2pi(tl.exp(-0.5 * z * z))
        dy = dy * (cdf + z * pdf)
    elif ACTIVATION == HARDSWISH:
        dy = tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, dy * (z / 3.0 + 0.5), dy))
    return dy
