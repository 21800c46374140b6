"""``sync_batch_norm_act``: batch norm + residual + activation with the statistics of a process group.

One all_gather in forward and one all_reduce in backward, both functional collectives
(torch.distributed._functional_collectives): eager they run at once; under torch.compile they are ops of the
graph, so a step traces whole (nn.SyncBatchNorm's c10d calls and ``.item()`` break it). Between and around
them run the pieces: the kernels' (tritonbn.kernels.grouped), as custom or triton ops while torch.compile
traces (ops.py), or PyTorch's (reference.py) where CPU tensors take the reference path. Every piece keeps the
group's statistics on the device; nothing here asks the device for a value.
"""

import torch
import torch.distributed as dist

from ..backend import uses_kernels
from ..plans import negated
from ..validation import check_activation, check_batch_norm_args, check_eps
from . import reference

if dist.is_available():
    import torch.distributed._functional_collectives as funcol

    # torch 2.13 renamed all_gather_tensor all_gather_single (the old name warns); torch 2.11 has only the old.
    _all_gather_single = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _waited(t: torch.Tensor) -> torch.Tensor:
    """An eager functional collective's result (an AsyncCollectiveTensor) once its data is there; traced ones
    are plain tensors already."""
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` (1-D, the same size on every rank), back to back in rank order."""
    return _waited(_all_gather_single(t, 0, group))


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """The sum of every rank's ``t``, a new tensor."""
    return _waited(funcol.all_reduce(t, "sum", group))


def _pieces(input: torch.Tensor, *tensors):
    """The pieces a call on ``input`` and ``tensors`` runs: the kernels (as ops while torch.compile traces), or
    PyTorch's (also for a tensor whose values PyTorch negates as it reads them: see plans.negated)."""
    if not uses_kernels(input):
        return reference
    if torch.compiler.is_compiling():
        from . import ops

        return ops.pieces(input)
    if negated(input, *tensors):
        return reference
    from ..kernels import grouped

    return grouped


class SyncBatchNormActFunction(torch.autograd.Function):
    """Autograd for the synchronized op. Saves x, the residual and the ranks' gathered statistics (a few C-sized
    rows per rank), from which backward merges the group's mean, rstd and count as forward did."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, momentum, eps, activation,
                negative_slope, group):
        pieces = _pieces(input, weight, bias, residual, running_mean, running_var)
        gathered = all_gather(pieces.local_moments(input), group)
        output = pieces.normalize(input, gathered, weight, bias, residual, running_mean, running_var, momentum, eps,
                                  activation, negative_slope)
        ctx.save_for_backward(input, weight, bias, residual, gathered)
        ctx.options = (eps, activation, negative_slope, group, pieces)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, residual, gathered = ctx.saved_tensors
        eps, activation, negative_slope, group, pieces = ctx.options
        if not torch.compiler.is_compiling() and grad_output.is_neg():  # plans.negated; traced, AOT resolves it
            grad_output = grad_output.resolve_neg()
        needs = tuple(bool(need) and tensor is not None
                      for need, tensor in zip(ctx.needs_input_grad[:4], (input, weight, bias, residual)))
        operands = (grad_output, input, gathered, weight, bias, residual)
        sums, grad_weight, grad_bias, grad_residual = pieces.grad_sums(*operands, eps, activation, negative_slope,
                                                                       needs)
        grad_input = None
        if needs[0]:  # every rank of a model asks alike, so every rank joins the collective, an empty one too
            grad_input = pieces.input_grad(*operands, grad_residual, all_reduce(sums, group), eps, activation,
                                           negative_slope, needs)
        # Weight and bias keep this rank's sums, as nn.SyncBatchNorm's: DistributedDataParallel averages them.
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None, None


def sync_batch_norm_act(input, running_mean, running_var, weight=None, bias=None, momentum=0.1, eps=1e-5, *,
                        activation="relu", negative_slope=0.01, residual=None, process_group=None):
    """``act(batch_norm(input) + residual)`` in training, with the batch statistics of every rank of
    ``process_group`` (default: the world), even a group of one. Arguments as for ``tritonbn.batch_norm_act``;
    ``momentum`` is the running averages' factor, or the num_batches_tracked counter (a tensor) whose
    reciprocal is (momentum=None), read on the device.

    Every rank of the group must call it alike (same channels, dtype, options), with any number of samples,
    none included. Whether the group holds more than one value per channel is known only on the device, so no
    rank raises for one: as nn.SyncBatchNorm in a group, the variance is then 0 and the running variance's
    unbiased update divides 0 by 0 (NaN). Where no rank holds a value, the running statistics stay.
    """
    check(input, running_mean, running_var, weight, bias, residual, eps, activation)
    return run(input, running_mean, running_var, weight, bias, momentum, eps, activation, negative_slope, residual,
               process_group)


def check(input, running_mean, running_var, weight, bias, residual, eps, activation) -> None:
    """A clear error for anything the synchronized op cannot compute, raised before any collective or state
    change (every rank raises alike, as every rank calls alike)."""
    check_activation(activation)
    check_eps(eps, training=True)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training=True,
                          check_batch_size=False)
    if input.shape[1] == 0:
        raise ValueError("SyncBatchNormAct needs at least one channel (as nn.SyncBatchNorm)")


def run(input, running_mean, running_var, weight, bias, momentum, eps, activation, negative_slope, residual,
        process_group):
    """The synchronized op for arguments ``check`` accepted."""
    group = process_group if process_group is not None else dist.group.WORLD
    return SyncBatchNormActFunction.apply(input, weight, bias, residual, running_mean, running_var, momentum, eps,
                                          activation, negative_slope, group)
