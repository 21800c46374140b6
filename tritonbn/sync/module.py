"""``SyncBatchNormAct``: drop-in nn.SyncBatchNorm followed by an activation (and a residual add), and
``convert_sync_batchnorm``, which turns a model's fused batch norms into it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..functional import recomputing
from ..modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _BatchNormAct, batch_norm_like
from . import function


class SyncBatchNormAct(_BatchNormAct):
    """``act(SyncBatchNorm(input) + residual)`` with statistics over ``process_group`` (default: the world).

    Mirrors nn.SyncBatchNorm: input of any rank >= 2, (N, C, ...); in training in a group of more than one rank
    the batch statistics are the group's (``sync_batch_norm_act``: one all_gather forward, one all_reduce
    backward, no host sync); outside training, without an initialized process group or in a group of one, it
    computes exactly what BatchNormAct does. Weight and bias gradients are the local ones
    (DistributedDataParallel averages them). ``momentum=None``'s factor, 1 / num_batches_tracked, is read on
    the device, where nn.SyncBatchNorm calls ``.item()``.
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
        counts_batches = self.track_running_stats and self.num_batches_tracked is not None
        if counts_batches and recomputing():  # activation checkpointing's second forward: no second update
            running_mean = running_var = None
            counts_batches = False
        cumulative = counts_batches and self.momentum is None
        function.check(input, running_mean, running_var, self.weight, self.bias, residual, self.eps, self.activation)
        # Counted only after the checks, so a rejected call changes no state, and before the call: momentum=None's
        # factor is 1 / (the count with this batch), read on the device.
        if counts_batches:
            self.num_batches_tracked.add_(1)
        # The factor: momentum, or the counter whose reciprocal it is (momentum=None), or 0 where nothing counts.
        momentum = self.num_batches_tracked if cumulative else 0.0 if self.momentum is None else self.momentum
        return function.run(input, running_mean, running_var, self.weight, self.bias, momentum, self.eps,
                            self.activation, self.negative_slope, residual, self.process_group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every tritonbn BatchNormAct{1,2,3}d of ``module`` by a SyncBatchNormAct sharing its state.

    Like nn.SyncBatchNorm.convert_sync_batchnorm it works in place and returns ``module`` (or the new
    layer when ``module`` itself is one). The activation stays with the batch norm (nn.SyncBatchNorm's
    conversion of timm's BatchNormAct2d loses it: huggingface/pytorch-image-models#1254), and so do the
    children a fused timm module keeps (its ``drop`` and ``act``). Plain nn.BatchNorm*d layers are left alone:
    run `tritonbn.fuse` first to turn the fusable ones into BatchNormAct, and
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
    for name, child in fused.named_children():
        sync.add_module(name, child)
    if hasattr(fused, "qconfig"):
        sync.qconfig = fused.qconfig
    return sync
