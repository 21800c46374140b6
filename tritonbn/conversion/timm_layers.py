"""timm's batch norm + activation modules, recognised without importing timm, for `fuse` and `unfuse`.

``timm.layers.BatchNormAct2d`` subclasses nn.BatchNorm2d.  Its forward is nn.BatchNorm2d's (the same
running-statistics update, cumulative average with ``momentum=None``, ``num_batches_tracked`` count), then its
child ``drop`` (nn.Identity unless built with a ``drop_layer``), then its child ``act`` (built from
``act_layer`` and ``act_kwargs``, e.g. nn.SiLU(inplace=True); nn.Identity with ``apply_act=False``).
``timm.layers.SyncBatchNormAct`` subclasses nn.SyncBatchNorm and applies ``drop`` and ``act`` after it where it
has them (timm's convert_sync_batchnorm gives it both).  So where ``drop`` is an identity and ``act`` is an
activation the kernels compute, one fused module computes what the timm module does: tritonbn's
BatchNormAct2d, or for a SyncBatchNormAct tritonbn's SyncBatchNormAct with the same process group, which
synchronises the statistics where nn.SyncBatchNorm does (training in a group of more than one rank) and is
a plain BatchNormAct elsewhere, as nn.SyncBatchNorm is a plain batch norm.

A class is taken for timm's when its module and name are timm's and so is its structure: its one base, its
own forward, children named ``drop`` and ``act`` and nothing else.  timm itself is never imported: a model
holding timm's modules has imported it already.

The fused module keeps the ``drop`` and ``act`` modules as children, which its forward does not call (the
kernels apply the activation), so the model's module tree stays as it was; and it records the class it
replaced, so that `unfuse` puts back timm's module with the ``act`` it had (``inplace`` and all).
"""

from __future__ import annotations

from torch import nn

from ..modules import BatchNormAct2d, batch_norm_like
from ..sync import SyncBatchNormAct
from .fused_graph import unfused_like

# Where timm defines these classes (timm.layers since timm 0.9, timm.models.layers before), and the packages
# that export them.
_NORM_ACT_MODULES = ("timm.layers.norm_act", "timm.models.layers.norm_act", "timm.layers", "timm.models.layers")
_ACTIVATION_MODULES = ("timm.layers.activations", "timm.models.layers.activations", "timm.layers",
                       "timm.models.layers")
# timm's class name -> (its base, the fused class that replaces it)
_NORM_ACT_CLASSES = {"BatchNormAct2d": (nn.BatchNorm2d, BatchNormAct2d),
                     "SyncBatchNormAct": (nn.SyncBatchNorm, SyncBatchNormAct)}
_CHILDREN = ("drop", "act")
# timm's own activation modules that compute one of the registry's activations exactly, by class name.
# ``act_layer="gelu"`` builds timm's GELU, whose forward is F.gelu(input); torch's nn.SiLU, nn.ReLU, ...
# are what its other names build.
_TIMM_ACTIVATIONS = {"GELU": "gelu"}
# The fused module's attribute naming the timm class it replaced.
_TIMM_CLASS = "_tritonbn_timm_class"


def is_timm_norm_act(module: nn.Module) -> bool:
    """Whether ``module``'s class has the module and the name of timm's BatchNormAct2d or SyncBatchNormAct
    (`unlike_timm` then checks its structure)."""
    cls = type(module)
    return cls.__module__ in _NORM_ACT_MODULES and cls.__qualname__ in _NORM_ACT_CLASSES


def unlike_timm(module: nn.Module) -> str | None:
    """How a module that `is_timm_norm_act` differs from timm's class of that name, or None when it does not:
    the class's one base and its own forward, children ``drop`` and ``act`` (both in a BatchNormAct2d, where
    present in a SyncBatchNormAct) and no other, and no attribute of those names that is not a child."""
    cls = type(module)
    base, _ = _NORM_ACT_CLASSES[cls.__qualname__]
    required = set(_CHILDREN) if cls.__qualname__ == "BatchNormAct2d" else set()
    if cls.__bases__ != (base,) or "forward" not in vars(cls):
        return f"its class is not derived from {base.__name__} alone with a forward of its own, as timm's is"
    if not required <= set(module._modules) <= set(_CHILDREN) or any(name in vars(module) for name in _CHILDREN):
        return f"its children {list(module._modules)} are not timm's {list(_CHILDREN)}"
    return None


def timm_activation(module: nn.Module) -> str | None:
    """The registry's name for one of timm's own activation modules that computes it exactly, else None."""
    cls = type(module)
    if cls.__module__ not in _ACTIVATION_MODULES or cls.__bases__ != (nn.Module,):
        return None
    return _TIMM_ACTIVATIONS.get(cls.__qualname__)


def fused_norm_act(module: nn.Module, activation: str, negative_slope: float) -> nn.Module:
    """The fused module computing ``activation(bn(input))`` with timm module ``module``'s state (shared),
    options and process group, holding its ``drop`` and ``act`` children and recording its class."""
    _, fused_class = _NORM_ACT_CLASSES[type(module).__qualname__]
    group = {"process_group": module.process_group} if fused_class is SyncBatchNormAct else {}
    fused = batch_norm_like(fused_class, module, activation=activation, negative_slope=negative_slope, **group)
    for name, child in module._modules.items():
        fused.add_module(name, child)
    vars(fused)[_TIMM_CLASS] = type(module)
    return fused


def unfused_norm_act(fused: nn.Module) -> nn.Module | None:
    """timm's module that `fused_norm_act` replaced by ``fused``, sharing ``fused``'s state and holding its
    ``drop`` and ``act``; None when ``fused`` was not made from a timm module."""
    timm_class = vars(fused).get(_TIMM_CLASS)
    if timm_class is None:
        return None
    module = unfused_like(timm_class, fused)
    for name in _CHILDREN:  # timm's constructor made a drop and an act of its own: the fused module's replace them
        module._modules.pop(name, None)
    for name, child in fused._modules.items():
        module.add_module(name, child)
    return module


def applies_activation(module: nn.Module) -> bool:
    """Whether ``module`` is timm's batch norm + activation with an activation other than the identity."""
    return is_timm_norm_act(module) and type(module._modules.get("act", nn.Identity())) is not nn.Identity
