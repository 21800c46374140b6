"""Plain PyTorch batch norm + residual + activation, following the method step by step.

This is what CPU tensors run when the Triton interpreter is off, so models keep working on any CPU. It
is differentiable through autograd. Statistics are taken in float32 (float64 for float64 input), as in
the kernels, and the output is cast back to the input's dtype.
"""

import torch
import torch.nn.functional as F

_ACTIVATION_FUNCTIONS = {
    "identity": lambda z, negative_slope: z,
    "relu": lambda z, negative_slope: F.relu(z),
    "leaky_relu": lambda z, negative_slope: F.leaky_relu(z, negative_slope),
    "relu6": lambda z, negative_slope: F.relu6(z),
    "elu": lambda z, negative_slope: F.elu(z),
    "silu": lambda z, negative_slope: F.silu(z),
    "gelu": lambda z, negative_slope: F.gelu(z),
    "hardswish": lambda z, negative_slope: F.hardswish(z),
}


def activate(z: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    """The activation ``activation`` (a name from ``tritonbn.ACTIVATIONS``) applied to ``z``."""
    return _ACTIVATION_FUNCTIONS[activation](z, negative_slope)


def _channel_view(t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an (N, C, ...) tensor."""
    return t.to(dtype).reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation, negative_slope, residual):
    compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(compute_dtype)
    reduce_dims = [0] + list(range(2, input.dim()))
    count = input.numel() // max(input.shape[1], 1)

    # Step 1: per-channel mean and variance, from the batch in training, else the running estimates.
    if training:
        var, mean = torch.var_mean(x, dim=reduce_dims, correction=0)
        if running_mean is not None and count > 0:
            with torch.no_grad():
                unbiased_var = var * (count / (count - 1))
                running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
                running_var.lerp_(unbiased_var.detach().to(running_var.dtype), momentum)
    else:
        mean, var = running_mean.to(compute_dtype), running_var.to(compute_dtype)

    # Step 2: normalise to zero mean and unit variance.
    x_hat = (x - _channel_view(mean, x.dim(), compute_dtype)) * torch.rsqrt(
        _channel_view(var, x.dim(), compute_dtype) + eps)
    # Step 3: scale and shift with the learnt gamma (weight) and beta (bias).
    z = x_hat
    if weight is not None:
        z = z * _channel_view(weight, x.dim(), compute_dtype)
    if bias is not None:
        z = z + _channel_view(bias, x.dim(), compute_dtype)
    if residual is not None:
        z = z + residual.to(compute_dtype)
    # Step 4: the non-linearity; the dtype is what bn(input) + residual would have.
    output_dtype = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
    return activate(z, activation, negative_slope).to(output_dtype)
