"""Plain PyTorch batch norm + residual + activation, following the method step by step: the package's one
PyTorch implementation of it.

This is what CPU tensors run when the Triton interpreter is off (so models keep working on any CPU), what
double backward differentiates, and what PyTorch's transforms see. It is differentiable through autograd.
Statistics are taken in float32 (float64 for float64 input), as in the kernels, and the output is cast back
to the input's dtype. (SyncBatchNormAct's pieces in PyTorch ops are tritonbn/sync/reference.py.)
"""

import math

import torch

from .activations import REGISTRY


def activate(z: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    """The activation ``activation`` (a name from ``tritonbn.ACTIVATIONS``) applied to ``z``."""
    return REGISTRY[activation].apply(z, negative_slope)


def _channel_view(t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an (N, C, ...) tensor."""
    return t.to(dtype).reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def count_per_channel(x: torch.Tensor) -> int:
    """How many values each channel's batch statistics are taken over: N * (spatial size).

    Under torch.jit.trace the sizes, and so the count, are tensors: the trace computes it for its input.
    """
    return math.prod((x.shape[0], *x.shape[2:]))


def compute_dtype(input: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, else float32: the precision all the arithmetic runs in."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def update_running_stats(running_mean, running_var, mean, m2, count, momentum, batches=None):
    """Move the running statistics towards the batch's (unbiased variance m2 / (count - 1)) with PyTorch's own
    formula, factor * batch + (1 - factor) * running: exact at factor 1 (``momentum=1`` and momentum=None's first
    batch), and an inf running value stays inf below it, as PyTorch's do (``lerp`` would give NaN). The factor is
    ``momentum``, or where that is None 1 / (``batches`` + 1): a num_batches_tracked counter not yet counting this
    batch, read on the device (no host sync, no graph break under torch.compile). Nothing to do without running
    statistics or for an empty batch."""
    # A trace cannot branch on its traced count (and its example batch is not empty).
    if running_mean is None or (not torch.jit.is_tracing() and count == 0):
        return
    dtype = torch.float64 if running_mean.dtype == torch.float64 else torch.float32
    factor = float(momentum) if momentum is not None else 1.0 / (batches + 1).to(dtype)
    keep = 1.0 - factor
    for running, batch in ((running_mean, mean), (running_var, m2 / (count - 1))):
        # Through ``.data``, as PyTorch's kernels write them: in place without bumping the version counter, so an
        # nn.BatchNorm sharing these buffers, which saved them for its backward, can still run that backward.
        running.data.copy_(factor * batch.detach().to(dtype) + keep * running.data.to(dtype))


def statistics(input, running_mean, running_var, training) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: per-channel (mean, biased variance), of the batch in training, else the running estimates.

    Two passes, the mean and then the mean square of the deviations from it: exact to a few roundings however
    large the mean is against the spread, and an inf in the batch gives the mean inf (and the variance NaN), as
    PyTorch's batch norm does (``torch.var_mean`` gives both NaN, and loses digits to a large mean)."""
    dtype = compute_dtype(input)
    if training:
        x, dims = input.to(dtype), _reduce_dims(input)
        mean = x.mean(dims, keepdim=True)
        return mean.flatten(), (x - mean).square().mean(dims)
    return running_mean.to(dtype), running_var.to(dtype)


def batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation, negative_slope, residual, batches=None):
    """The op; ``batches``: a module's num_batches_tracked, which counts this batch (see functional.run)."""
    mean, var = statistics(input, running_mean, running_var, training)
    if training:  # Step 5: the running averages move towards the batch's (unbiased) statistics
        count = count_per_channel(input)
        update_running_stats(running_mean, running_var, mean, var * count, count, momentum, batches)
        if batches is not None:
            batches.add_(1)
    return normalize_act(input, mean, torch.rsqrt(var + eps), weight, bias, activation, negative_slope, residual)


def normalize_act(input, mean, rstd, weight, bias, activation, negative_slope, residual):
    """Steps 2 to 4 with given per-channel statistics: act((x - mean) * rstd * weight + bias [+ residual])."""
    _, z = _pre_activation(input, mean, rstd, weight, bias, residual, compute_dtype(input))
    # Step 4: the non-linearity.
    return activate(z, activation, negative_slope).to(output_dtype(input, residual))


def _pre_activation(input, mean, rstd, weight, bias, residual, dtype):
    """(xhat, z): steps 2 and 3 (and the residual add) in ``dtype``."""
    # Step 2: normalise to zero mean and unit variance.
    xhat = (input.to(dtype) - _channel_view(mean, input.dim(), dtype)) * _channel_view(rstd, input.dim(), dtype)
    # Step 3: scale and shift with the learnt gamma (weight) and beta (bias).
    z = xhat
    if weight is not None:
        z = z * _channel_view(weight, input.dim(), dtype)
    if bias is not None:
        z = z + _channel_view(bias, input.dim(), dtype)
    if residual is not None:
        z = z + residual.to(dtype)
    return xhat, z


def output_dtype(input: torch.Tensor, residual) -> torch.dtype:
    """The dtype of act(bn(input) + residual): the input's, promoted with the residual's as an add does."""
    return input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)

