"""SyncBatchNormAct's pieces in PyTorch ops: what CPU tensors run without Triton's interpreter (and under
``tritonbn.cpu_reference()``), with the contract of tritonbn.kernels.grouped and the same design: every
statistic of the group stays a tensor, so nothing waits for the device and torch.compile traces it whole.

A rank contributes (count, mean, M2) per channel in float64 (counts exact, and a merge as precise as one
rank's); every piece merges the gathered ranks' statistics itself, as the kernels do.
"""

import torch

from ..reference import _pre_activation, activate, compute_dtype, normalize_act

_ROWS = 3  # (count, mean, M2) per channel


def _reduce_dims(x):
    return [0, *range(2, x.dim())]


def local_moments(x: torch.Tensor) -> torch.Tensor:
    """This rank's (count, mean, M2) per channel, flat [3 * C] float64; zeros for an empty rank."""
    channels = x.shape[1]
    count = x.numel() // channels  # from the shape: no device value read
    if count == 0:
        return torch.zeros(_ROWS * channels, dtype=torch.float64, device=x.device)
    x = x.to(torch.float64)
    # Two passes, not var_mean, whose mean of a channel holding an inf is NaN (batch norm's is inf).
    mean = x.mean(_reduce_dims(x))
    m2 = (x - mean.view((1, -1) + (1,) * (x.dim() - 2))).square().sum(_reduce_dims(x))
    return torch.cat([mean.new_full((channels,), count), mean, m2])


def _group_stats(gathered, x, eps):
    """(count, mean, M2, rstd) per channel of the group, from the ranks' gathered moments (Chan et al.'s merge).
    Counts, means and M2s of empty ranks are 0: they add nothing."""
    counts, means, m2s = gathered.view(-1, _ROWS, x.shape[1]).unbind(1)
    count = counts.sum(0)
    divisor = torch.where(count > 0, count, 1.0)  # every rank empty: finite placeholders, which nothing reads
    mean = (counts * means).sum(0) / divisor
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return count, mean, m2, torch.rsqrt(m2 / divisor + eps)


def _update_running(running_mean, running_var, count, mean, m2, momentum):
    """reference.update_running_stats's formula with the group's count a tensor: a channel without values
    (every rank empty) keeps its running statistics, decided on the device."""
    factor = 1.0 / momentum.to(torch.float64) if isinstance(momentum, torch.Tensor) else float(momentum)
    for running, batch in ((running_mean, mean), (running_var, m2 / (count - 1))):
        old = running.data.to(torch.float64)
        running.data.copy_(torch.where(count > 0, factor * batch + (1.0 - factor) * old, old))


def normalize(x, gathered, weight, bias, residual, running_mean, running_var, momentum, eps, activation,
              negative_slope):
    """act((x - mean) * rstd * weight + bias [+ residual]) with the group's statistics; the running statistics
    (where given) move towards them. ``momentum``: the factor, or the num_batches_tracked counter (a tensor)
    whose reciprocal is (momentum=None)."""
    count, mean, m2, rstd = _group_stats(gathered, x, eps)
    if running_mean is not None:
        _update_running(running_mean, running_var, count, mean, m2, momentum)
    dtype = compute_dtype(x)
    return normalize_act(x, mean.to(dtype), rstd.to(dtype), weight, bias, activation, negative_slope, residual)


def _dz_and_xhat(dy, x, gathered, weight, bias, residual, eps, activation, negative_slope):
    """(count, rstd, dz, xhat): dz = dy * act'(z), z recomputed from x, through the activation's own derivative
    (torch.func.vjp, which torch.compile traces where it breaks the graph at torch.autograd.grad)."""
    count, mean, _, rstd = _group_stats(gathered, x, eps)
    dtype = compute_dtype(x)
    rstd = rstd.to(dtype)
    xhat, z = _pre_activation(x, mean.to(dtype), rstd, weight, bias, residual, dtype)
    _, activation_vjp = torch.func.vjp(lambda z: activate(z, activation, negative_slope), z)
    (dz,) = activation_vjp(dy.to(dtype))
    return count.to(dtype), rstd, dz, xhat


def grad_sums(dy, x, gathered, weight, bias, residual, eps, activation, negative_slope, needs):
    """(this rank's sums [2 * C], of dz then of dz * xhat; grad weight; grad bias; grad residual = dz), None for
    the gradients ``needs`` (input, weight, bias, residual) does not ask for."""
    _, _, dz, xhat = _dz_and_xhat(dy, x, gathered, weight, bias, residual, eps, activation, negative_slope)
    sum_dz, sum_dz_xhat = dz.sum(_reduce_dims(x)), (dz * xhat).sum(_reduce_dims(x))
    dweight = sum_dz_xhat.to(weight.dtype) if needs[1] else None
    dbias = sum_dz.to(bias.dtype) if needs[2] else None
    return torch.cat([sum_dz, sum_dz_xhat]), dweight, dbias, dz.to(dy.dtype) if needs[3] else None


def input_grad(dy, x, gathered, weight, bias, residual, dresidual, sums, eps, activation, negative_slope, needs):
    """The input's gradient from the group's ``sums`` (``grad_sums``'s, all-reduced) and value count."""
    count, rstd, dz, xhat = _dz_and_xhat(dy, x, gathered, weight, bias, residual, eps, activation, negative_slope)
    view = (1, -1) + (1,) * (x.dim() - 2)
    sum_dz, sum_dz_xhat = (sums.to(dz.dtype).view(2, -1) / count).view(2, *view).unbind(0)
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    return ((dz - sum_dz - xhat * sum_dz_xhat) * scale.view(view)).to(x.dtype)
