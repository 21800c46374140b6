"""Plain PyTorch batch norm + residual + activation, following the method step by step.

This is what CPU tensors run when the Triton interpreter is off, so models keep working on any CPU. It
is differentiable through autograd. Statistics are taken in float32 (float64 for float64 input), as in
the kernels, and the output is cast back to the input's dtype.
"""

import torch

from .activations import REGISTRY


def activate(z: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    """The activation ``activation`` (a name from ``tritonbn.ACTIVATIONS``) applied to ``z``."""
    return REGISTRY[activation].apply(z, negative_slope)


def _channel_view(t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an (N, C, ...) tensor."""
    return t.to(dtype).reshape((1, -1) + (1,) * (ndim - 2))


def compute_dtype(input: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, else float32: the precision all the arithmetic runs in."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def update_running_stats(running_mean, running_var, mean, m2, count, momentum):
    """Move the running statistics towards the batch's (unbiased variance m2 / (count - 1)) by ``momentum``,
    as PyTorch does; nothing to do without running statistics or for an empty batch."""
    if running_mean is None or count == 0:
        return
    with torch.no_grad():
        running_mean.lerp_(mean.detach().to(running_mean.dtype), float(momentum))
        running_var.lerp_((m2.detach() / (count - 1)).to(running_var.dtype), float(momentum))


def batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation, negative_slope, residual):
    dtype = compute_dtype(input)
    # Step 1: per-channel mean and variance, from the batch in training, else the running estimates.
    if training:
        var, mean = torch.var_mean(input.to(dtype), dim=[0] + list(range(2, input.dim())), correction=0)
        count = input.numel() // max(input.shape[1], 1)
        update_running_stats(running_mean, running_var, mean, var * count, count, momentum)
    else:
        mean, var = running_mean.to(dtype), running_var.to(dtype)
    return normalize_act(input, mean, torch.rsqrt(var + eps), weight, bias, activation, negative_slope, residual)


def normalize_act(input, mean, rstd, weight, bias, activation, negative_slope, residual):
    """Steps 2 to 4 with given per-channel statistics: act((x - mean) * rstd * weight + bias [+ residual])."""
    dtype = compute_dtype(input)
    x = input.to(dtype)
    # Step 2: normalise to zero mean and unit variance.
    z = (x - _channel_view(mean, x.dim(), dtype)) * _channel_view(rstd, x.dim(), dtype)
    # Step 3: scale and shift with the learnt gamma (weight) and beta (bias).
    if weight is not None:
        z = z * _channel_view(weight, x.dim(), dtype)
    if bias is not None:
        z = z + _channel_view(bias, x.dim(), dtype)
    if residual is not None:
        z = z + residual.to(dtype)
    # Step 4: the non-linearity.
    return activate(z, activation, negative_slope).to(output_dtype(input, residual))


def output_dtype(input: torch.Tensor, residual) -> torch.dtype:
    """The dtype of act(bn(input) + residual): the input's, promoted with the residual's as an add does."""
    return input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
