"""The fused kernels as torch.library custom ops, so torch.compile sees one opaque op, not a graph break.

Eager code keeps using ``BatchNormActFunction`` (cheaper to call); ``tritonbn.functional`` routes the
kernel path here only while torch.compile traces.  Every op has a fake implementation (shapes and
dtypes without running a kernel).  ``batch_stats`` updates the running statistics in place, which
``mutates_args`` declares, so a compiled step updates them once; an op that mutates cannot carry an
autograd formula, so the gradient lives on ``normalize_act``, whose formula differentiates through the
batch statistics in training.  Importing this module registers the ops; it imports no Triton until an
op runs.
"""

import torch
from torch import Tensor

from .reference import compute_dtype, update_running_stats


def _channel_stats_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=compute_dtype(x))


@torch.library.custom_op("tritonbn::batch_stats", mutates_args=("running_mean", "running_var"))
def batch_stats(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> tuple[Tensor, Tensor]:
    """Batch (mean, rstd) per channel; updates the running statistics (unbiased variance) when given.

    No autograd formula: ops that mutate cannot have one.  ``normalize_act``'s formula with
    ``training=True`` already differentiates through the statistics, so callers pass a detached input.
    """
    from .kernels import grouped

    mean, m2 = grouped.channel_moments(input)
    count = input.numel() // input.shape[1]
    update_running_stats(running_mean, running_var, mean, m2, count, momentum)
    return mean, torch.rsqrt(m2 / max(count, 1) + eps)


@batch_stats.register_fake
def _(input, running_mean, running_var, momentum, eps):
    return _channel_stats_like(input), _channel_stats_like(input)


@torch.library.custom_op("tritonbn::normalize_act", mutates_args=())
def normalize_act(input: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
                  residual: Tensor | None, activation: str, negative_slope: float, training: bool) -> Tensor:
    """act((input - mean) * rstd * weight + bias [+ residual]); ``training`` says whether mean and rstd
    are the batch's own statistics, which the gradient of ``input`` then accounts for."""
    from .kernels import grouped

    return grouped.normalize_act(input, mean, rstd, weight, bias, activation, negative_slope, residual)


def _output_like(input: Tensor, dtype: torch.dtype) -> Tensor:
    """A new tensor with the strides the kernels give their output for ``input`` (see ``output_layout``)."""
    from .kernels.plan import output_layout

    return input.new_empty_strided(input.shape, output_layout(input.shape, input.stride())[0], dtype=dtype)


@normalize_act.register_fake
def _(input, mean, rstd, weight, bias, residual, activation, negative_slope, training):
    out_dtype = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
    return _output_like(input, out_dtype)


@torch.library.custom_op("tritonbn::backward", mutates_args=())
def backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
             bias: Tensor | None, residual: Tensor | None, activation: str, negative_slope: float,
             training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad input, sum of dz * xhat, sum of dz, grad residual); the last is empty without a residual.

    The sums are the weight and bias gradients.  Ops cannot return None, hence the empty tensor.
    """
    from .kernels import grouped

    args = (grad_output, input, mean, rstd, weight, bias, activation, negative_slope, residual)
    sum_dz, sum_dz_xhat = grouped.backward_reduce(*args)
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    grad_input, grad_residual = grouped.backward_input(*args, sum_dz, sum_dz_xhat, count, training)
    if grad_residual is None:
        grad_residual = input.new_empty(0)
    return grad_input, sum_dz_xhat, sum_dz, grad_residual


@backward.register_fake
def _(grad_output, input, mean, rstd, weight, bias, residual, activation, negative_slope, training):
    grad_residual = _output_like(input, grad_output.dtype) if residual is not None else input.new_empty(0)
    return _output_like(input, input.dtype), torch.empty_like(mean), torch.empty_like(mean), grad_residual


def _setup_normalize_act(ctx, inputs, output):
    input, mean, rstd, weight, bias, residual, activation, negative_slope, training = inputs
    ctx.save_for_backward(input, mean, rstd, weight, bias, residual)
    ctx.activation, ctx.negative_slope, ctx.training = activation, negative_slope, training


def _backward_normalize_act(ctx, grad_output):
    input, mean, rstd, weight, bias, residual = ctx.saved_tensors
    grad_input, sum_dz_xhat, sum_dz, grad_residual = backward(
        grad_output, input, mean, rstd, weight, bias, residual, ctx.activation, ctx.negative_slope, ctx.training)
    grad_weight = None if weight is None else sum_dz_xhat.to(weight.dtype)
    grad_bias = None if bias is None else sum_dz.to(bias.dtype)
    grad_residual = None if residual is None else grad_residual
    return grad_input, None, None, grad_weight, grad_bias, grad_residual, None, None, None


normalize_act.register_autograd(_backward_normalize_act, setup_context=_setup_normalize_act)


def batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                   negative_slope, residual):
    """What ``BatchNormActFunction.apply`` computes, through the custom ops (arguments already checked)."""
    if training:
        mean, rstd = batch_stats(input.detach(), running_mean, running_var, momentum, eps)
    else:
        mean = running_mean.to(compute_dtype(input))
        rstd = torch.rsqrt(running_var.to(compute_dtype(input)) + eps)
    return normalize_act(input, mean, rstd, weight, bias, residual, activation, negative_slope, training)
