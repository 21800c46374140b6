"""Stand-ins for timm's batch norm + activation modules, for the CPU suite, where timm does not import.

They carry timm's module paths and class names (timm.layers.norm_act.BatchNormAct2d, ...SyncBatchNormAct,
timm.layers.activations.GELU) and timm's structure: the base class, the constructor's arguments, the
``drop`` and ``act`` children, and a forward that is the base batch norm's followed by ``drop`` and ``act``
(timm's BatchNormAct2d spells out nn.BatchNorm2d's forward; its SyncBatchNormAct calls nn.SyncBatchNorm's and
applies ``drop`` and ``act`` where it has them).  tests/conversion/test_timm_real.py checks them against
the real classes where timm imports.
"""

from torch import nn
from torch.nn import functional as F

NORM_ACT_MODULE = "timm.layers.norm_act"


def make_act(act_layer, act_kwargs=None, inplace=True, apply_act=True) -> nn.Module:
    """The ``act`` child as timm builds it: ``act_layer(inplace=..., **act_kwargs)``, without ``inplace``
    where the layer takes none, and nn.Identity when ``apply_act`` is False."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    try:
        return act_layer(inplace=inplace, **kwargs)
    except TypeError:
        return act_layer(**kwargs)


class BatchNormAct2d(nn.BatchNorm2d):
    __module__ = NORM_ACT_MODULE

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """Made by timm's convert_sync_batchnorm from a BatchNormAct2d, which then sets its drop and act."""

    __module__ = NORM_ACT_MODULE

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class GELU(nn.Module):
    """timm's GELU (what ``act_layer="gelu"`` builds): exact GELU, with an ``inplace`` argument it ignores."""

    __module__ = "timm.layers.activations"

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, input):
        return F.gelu(input)


def sync_from(bn: BatchNormAct2d, process_group=None) -> SyncBatchNormAct:
    """What timm's convert_sync_batchnorm makes of ``bn``: a SyncBatchNormAct sharing its state, drop and act."""
    sync = SyncBatchNormAct(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                            process_group=process_group)
    sync.act, sync.drop = bn.act, bn.drop
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    sync.running_mean, sync.running_var, sync.num_batches_tracked = (
        bn.running_mean, bn.running_var, bn.num_batches_tracked)
    return sync
