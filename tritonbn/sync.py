"""Synchronized batch norm + activation over a torch.distributed process group.

Each rank reduces its own slice of the batch to per-channel (count, mean, M2); one all_gather brings
every rank's triple to every rank, where they are merged exactly with Chan's parallel formula.  The
backward pass all-reduces the two per-channel sums (of dz and dz * xhat) in one collective.  Ranks may
hold any number of samples, zero included: they still join both collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import reference
from .backend import uses_kernels
from .functional import recomputing
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _BatchNormAct, batch_norm_like
from .reference import compute_dtype, count_per_channel, update_running_stats
from .validation import check_batch_norm_args, check_eps

# ---------------------------------------------------------------------------------------------------
# Per-rank primitives: the Triton kernels, or the same computations in PyTorch where they cannot run
# ---------------------------------------------------------------------------------------------------


def _primitives(x: torch.Tensor):
    """The module computing a rank's pieces: the kernels, or reference.py's same four functions."""
    if uses_kernels(x):
        from .kernels import grouped

        return grouped
    return reference


# ---------------------------------------------------------------------------------------------------
# Statistics over the group
# ---------------------------------------------------------------------------------------------------


def _gather_moments(x: torch.Tensor, primitives, process_group) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(global count, global mean, global M2) of every channel, merged exactly from all ranks.

    The gathered triples travel in float64 so that counts stay exact and the merge loses nothing.
    """
    num_channels = x.shape[1]
    local_count = count_per_channel(x)
    if local_count > 0:
        mean, m2 = primitives.channel_moments(x)
    else:
        mean = m2 = torch.zeros(num_channels, dtype=compute_dtype(x), device=x.device)
    local = torch.cat([mean.new_full((1,), local_count), mean, m2]).to(torch.float64)
    gathered = local.new_empty(dist.get_world_size(process_group), local.numel())
    dist.all_gather(list(gathered.unbind(0)), local, group=process_group)
    counts, means, m2s = gathered[:, :1], gathered[:, 1 : num_channels + 1], gathered[:, num_channels + 1 :]
    # Chan et al.: M2 of the union = sum of the parts' M2 + sum of n_r * (mean_r - mean)^2.
    count = counts.sum()
    global_mean = (counts * means).sum(0) / count
    global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)
    return int(count.item()), global_mean, global_m2


class _SyncBatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, eps, momentum, activation,
                negative_slope, process_group):
        primitives = _primitives(input)
        count, mean, m2 = _gather_moments(input, primitives, process_group)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} over the group")
        update_running_stats(running_mean, running_var, mean, m2, count, momentum)
        stat_dtype = compute_dtype(input)
        rstd = (m2 / count + eps).rsqrt().to(stat_dtype)
        mean = mean.to(stat_dtype)
        if input.numel() > 0:
            out = primitives.normalize_act(input, mean, rstd, weight, bias, activation, negative_slope, residual)
        else:
            out = torch.empty_like(input, dtype=reference.output_dtype(input, residual))
        ctx.save_for_backward(input, weight, bias, residual, mean, rstd)
        ctx.options = (activation, negative_slope, count, process_group, primitives)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, residual, mean, rstd = ctx.saved_tensors
        activation, negative_slope, count, process_group, primitives = ctx.options
        act = (weight, bias, activation, negative_slope, residual)
        if input.numel() > 0:
            sum_dz, sum_dz_xhat = primitives.backward_reduce(grad_output, input, mean, rstd, *act)
        else:
            sum_dz = sum_dz_xhat = torch.zeros_like(mean)
        # One collective for both sums; weight and bias keep the local sums, as nn.SyncBatchNorm does
        # (DistributedDataParallel averages parameter gradients itself).
        global_sums = torch.cat([sum_dz, sum_dz_xhat])
        dist.all_reduce(global_sums, group=process_group)
        global_sum_dz, global_sum_dz_xhat = global_sums.chunk(2)
        if input.numel() > 0:
            grad_input, grad_residual = primitives.backward_input(
                grad_output, input, mean, rstd, *act, global_sum_dz, global_sum_dz_xhat, count)
        else:
            grad_input = torch.zeros_like(input)
            grad_residual = None if residual is None else torch.zeros_like(residual)
        grad_weight = None if weight is None else sum_dz_xhat.to(weight.dtype)
        grad_bias = None if bias is None else sum_dz.to(bias.dtype)
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------


class SyncBatchNormAct(_BatchNormAct):
    """``act(SyncBatchNorm(input) + residual)`` with statistics over ``process_group``.

    Mirrors nn.SyncBatchNorm: input of any rank >= 2, (N, C, ...); outside training, without an
    initialized process group or in a group of one, it computes exactly what BatchNormAct does.
    Weight and bias gradients are the local ones (DistributedDataParallel averages them).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True, activation="relu",
                 negative_slope=0.01):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias, activation=activation, negative_slope=negative_slope)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and self._group_size() > 1):
            return super().forward(input, residual)
        self._check_input_dim(input)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        # Whether there is more than one value per channel depends on the whole group's count, which the
        # Function checks after gathering it: every rank knows it, so every rank raises alike.
        check_eps(self.eps, training=True)
        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias, residual, training=True,
                              check_batch_size=False)
        counts_batches = self.track_running_stats and self.num_batches_tracked is not None
        if counts_batches and recomputing():  # activation checkpointing's second forward: no second update
            running_mean = running_var = None
            counts_batches = False
        cumulative = counts_batches and self.momentum is None
        # The batch is counted only after the checks: momentum=None's factor is 1 / (the count with this batch).
        average_factor = self.num_batches_tracked + 1 if cumulative else self._average_factor(False)
        out = _SyncBatchNormActFunction.apply(
            input, self.weight, self.bias, residual, running_mean, running_var, self.eps, average_factor,
            self.activation, self.negative_slope, self.process_group or dist.group.WORLD,
        )
        # Counted only now that the group's batch passed the checks: a rejected call changes no state.
        if counts_batches:
            self.num_batches_tracked.add_(1)
        return out


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every tritonbn BatchNormAct{1,2,3}d of ``module`` by a SyncBatchNormAct sharing its state.

    Like nn.SyncBatchNorm.convert_sync_batchnorm it works in place and returns ``module`` (or the new
    layer when ``module`` itself is one).  Plain nn.BatchNorm*d layers are left alone: run
    `tritonbn.fuse` first to turn the fusable ones into BatchNormAct, and
    nn.SyncBatchNorm.convert_sync_batchnorm for the rest.
    """
    if type(module) in (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d):
        return _sync_from(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _sync_from(fused: nn.Module, process_group) -> SyncBatchNormAct:
    sync = batch_norm_like(SyncBatchNormAct, fused, process_group=process_group, activation=fused.activation,
                           negative_slope=fused.negative_slope)
    if hasattr(fused, "qconfig"):
        sync.qconfig = fused.qconfig
    return sync
