"""Activations fused into the batch-norm kernels, chosen at compile time by a ``tl.constexpr`` id.

Each forward and each derivative is PyTorch's own formula for that op (the one its CUDA kernel and its
scalar CPU loop evaluate), so NaN and inf propagate the same way and each kink sends the gradient to the
same side, and fused and unfused models produce the same values and gradients. Derivatives come as
``dy * act'(z)`` evaluated the way PyTorch writes it, which is not always the same as multiplying: where
PyTorch selects between dy and 0, a NaN or inf ``dy`` is dropped, not turned into NaN.

PyTorch's vectorised CPU loops disagree with those formulas at a NaN pre-activation (relu6's gradient is
0 there, elu's and hardswish's NaN, where the CUDA kernels and the scalar loop pass dy through), and the
float32 one gives gelu(+inf) = NaN; the formulas here follow CUDA. Its CUDA hardswish multiplies by 1/6
rounded to float32, even for float64 input (3e-8 relative); here float64 is divided by 6 in float64, as on
PyTorch's CPU.

Precision: z, dy and negative_slope come in the compute dtype (float32, or float64 for float64 input),
and every operation stays in it. Constants that are not exact in float32 are built in the compute dtype
with ``_const``: a bare float literal is a float32 constant in some Triton versions, which would round an
irrational constant to float32 before widening it. ``tl.exp``, ``tl.log`` and ``tl.math.erf`` are
libdevice's float64 functions on CUDA and numpy's under the interpreter.
"""

import torch
import triton
import triton.language as tl

from ..activations import KERNEL_IDS

# The registry's ids (tritonbn/activations.py) as ``tl.constexpr`` so the jit functions can branch on them.
IDENTITY = tl.constexpr(KERNEL_IDS["identity"])
RELU = tl.constexpr(KERNEL_IDS["relu"])
LEAKY_RELU = tl.constexpr(KERNEL_IDS["leaky_relu"])
RELU6 = tl.constexpr(KERNEL_IDS["relu6"])
ELU = tl.constexpr(KERNEL_IDS["elu"])
SILU = tl.constexpr(KERNEL_IDS["silu"])
GELU = tl.constexpr(KERNEL_IDS["gelu"])
HARDSWISH = tl.constexpr(KERNEL_IDS["hardswish"])


def _torch_hardswish_kinks_go_outward() -> bool:
    """Whether the installed PyTorch's hardswish gradient is 0 at z = -3 and dy at z = 3.

    PyTorch changed this in 2025 (pytorch/pytorch#148049; CPU and CUDA alike): before, -3 and 3 belonged to
    the middle piece, dy * (z / 3 + 1/2), i.e. -dy/2 and 3dy/2. Asking the op itself keeps the fused
    gradient equal to the unfused one under either version.
    """
    grad = torch.ops.aten.hardswish_backward(
        torch.ones(2, dtype=torch.float64), torch.tensor([-3.0, 3.0], dtype=torch.float64)
    )
    return grad.tolist() == [0.0, 1.0]


_HARDSWISH_KINKS_OUTWARD = tl.constexpr(_torch_hardswish_kinks_go_outward())

# Constants as PyTorch computes them in double (C's M_SQRT1_2 and M_2_SQRTPI * M_SQRT1_2 * 0.5, evaluated
# left to right), then rounded once to the compute dtype by _const.
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(1.1283791670955126 * 0.7071067811865476 * 0.5)


@triton.jit
def _const(value: tl.constexpr, like):
    """``value`` rounded once, to the dtype of ``like``, shaped like it."""
    return tl.full(like.shape, value, like.dtype)


@triton.jit
def _expm1(z):
    """exp(z) - 1 without the cancellation that loses all digits for small |z| (elu(-1e-8) would come out
    as -9.99999993922529e-09 in float64, and as 0 for |z| under 5.6e-17), as PyTorch's elu uses expm1.

    Kahan's identity: with u = exp(z) rounded, (u - 1) * z / log(u) is within a few ulps of expm1(z) even
    though u carries an error, because log(u) sees the same u. Taken apart: u == 1, where expm1(z) is z to
    the last bit (-0 included), and u - 1 == -1, where e^z is below half an ulp of 1 and -1 is the answer
    (there u may be subnormal or 0, too inexact for the identity). Written with exp and log because the
    interpreter has no libdevice (whose expm1 would serve on CUDA).
    """
    u = tl.exp(z)
    um1 = u - 1.0
    is_one = u == 1.0
    # log(1) = 0: divide by 1 there instead, so that the discarded lane computes no 0 / 0 (which numpy,
    # under the interpreter, warns about).
    result = um1 * z / tl.where(is_one, 1.0, tl.log(u))
    result = tl.where(is_one, z, result)
    return tl.where(um1 == -1.0, um1, result)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def activation_forward(z, negative_slope, ACTIVATION: tl.constexpr):
    """act(z), as PyTorch computes it; a NaN ``z`` comes out as NaN for every activation."""
    if ACTIVATION == RELU:
        # clamp_min(z, 0), which keeps NaN (and -0).
        z = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == LEAKY_RELU:
        # z > 0 ? z : z * slope, so that zeros get their sign from the product as in PyTorch.
        z = tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == RELU6:
        # hardtanh(z, 0, 6), i.e. clamp(z, 0, 6), which keeps NaN.
        z = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACTIVATION == ELU:
        z = tl.where(z > 0, z, _expm1(z))
    elif ACTIVATION == SILU:
        # z / (1 + exp(-z)): one rounding fewer than z * sigmoid(z); NaN at -inf as in PyTorch.
        z = z / (1.0 + tl.exp(-z))
    elif ACTIVATION == GELU:
        z = z * 0.5 * (1.0 + tl.math.erf(z * _const(_SQRT_HALF, z)))
    elif ACTIVATION == HARDSWISH:
        # z * clamp(z + 3, 0, 6) / 6, divided by 6 in the compute dtype: 1/6 has no exact binary value.
        z = z * tl.where(z < -3.0, 0.0, tl.where(z > 3.0, 6.0, z + 3.0)) / 6.0
    return z


@triton.jit
def activation_backward(dy, z, negative_slope, ACTIVATION: tl.constexpr):
    """dy * act'(z), written as PyTorch's backward of the same op: the comparisons pick the same side of
    each kink, and the same side for a NaN ``z`` (where a comparison with NaN is false)."""
    if ACTIVATION == RELU:
        # threshold_backward(dy, relu(z), 0): dy unless relu(z) <= 0, so a NaN z passes dy through.
        dy = tl.where(z <= 0, 0.0, dy)
    elif ACTIVATION == LEAKY_RELU:
        dy = tl.where(z > 0, dy, dy * negative_slope)
    elif ACTIVATION == RELU6:
        # hardtanh_backward: 0 where z <= 0 or z >= 6, else dy (a NaN z passes dy through).
        dy = tl.where((z <= 0) | (z >= 6.0), 0.0, dy)
    elif ACTIVATION == ELU:
        # z <= 0 ? dy * exp(z) : dy, so a NaN z passes dy through.
        dy = tl.where(z <= 0, dy * tl.exp(z), dy)
    elif ACTIVATION == SILU:
        sig = _sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _const(_SQRT_HALF, z)))
        pdf = tl.exp(-0.5 * z * z) * _const(_INV_SQRT_2PI, z)
        dy = dy * (cdf + z * pdf)
    elif ACTIVATION == HARDSWISH:
        # 0 on the flat left piece, dy * (z / 3 + 1/2) in the middle, dy on the right; a NaN z passes dy.
        if _HARDSWISH_KINKS_OUTWARD:
            dy = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, dy * (z / 3.0 + 0.5), dy))
        else:
            dy = tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, dy * (z / 3.0 + 0.5), dy))
    return dy
