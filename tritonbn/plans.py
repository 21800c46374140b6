"""The kernels' forward plans, cached per specialization: shapes, strides, dtypes and devices of a call's
tensors and its options. ``functional.prepare`` checks a call's arguments before planning it, so a cached
plan also means its arguments were checked; the custom ops (``ops.py``) plan arguments already checked.
"""

import torch

from .activations import REGISTRY

PLANS: dict = {}  # functional.prepare looks plans up here itself: the hot path
_MAXPLANS = 4096  # distinct specializations; a program that keeps making new shapes just re-plans


def key(input, weight, bias, residual, running_mean, running_var, training, activation, counting=0) -> tuple:
    """What a plan (and the checks of its arguments) depends on; ``counting`` as for functional.prepare. Written
    out: a call builds one per call."""
    return (input.shape, input.stride(), input.dtype, input.device,
            None if weight is None else (weight.shape, weight.stride(), weight.dtype, weight.device),
            None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device),
            None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device),
            None if running_mean is None else (running_mean.shape, running_mean.stride(), running_mean.dtype,
                                               running_mean.device),
            None if running_var is None else (running_var.shape, running_var.stride(), running_var.dtype,
                                              running_var.device),
            training, activation, counting)


def cached(plan_key: tuple):
    return PLANS.get(plan_key)


def new(plan_key, input, weight, bias, residual, running_mean, running_var, training, activation, counting=0):
    """Plan a call (its tensors define the layouts and tiling) and cache the plan under ``plan_key``."""
    from . import kernels  # Triton is imported when a kernel is first planned, not with tritonbn

    if len(PLANS) >= _MAXPLANS:
        PLANS.clear()
    plan = PLANS[plan_key] = kernels.ForwardPlan(input, weight, bias, residual, running_mean, running_var, training,
                                                  REGISTRY[activation].kernel_id, counting=counting)
    plan.activation = activation  # the name, for double backward's PyTorch recomputation
    return plan


def plan_for(input, weight, bias, residual, running_mean, running_var, training, activation, counting=0):
    """The cached plan for arguments already checked."""
    plan_key = key(input, weight, bias, residual, running_mean, running_var, training, activation, counting)
    return cached(plan_key) or new(plan_key, input, weight, bias, residual, running_mean, running_var, training,
                                   activation, counting)


def clear() -> None:
    """Forget every plan, eager's and torch.compile's (a configuration override, say, should take effect for
    shapes planned already)."""
    PLANS.clear()
    _TRACEDPLANS.clear()


class StaticLayout:
    """What a plan reads of a tensor (shape, strides, dtype, device), every size a plain int. Made from a tensor
    torch.compile traces, where sizes may be SymInts: int() of one makes Dynamo guard on its value, so the
    compiled graph is specialized on the shape and the plan cache is never keyed on a SymInt."""

    __slots__ = ("shape", "_stride", "dtype", "device")

    def __init__(self, t):
        self.shape = torch.Size(int(size) for size in t.shape)
        self._stride = tuple(int(step) for step in t.stride())
        self.dtype, self.device = t.dtype, t.device

    def stride(self):
        return self._stride


def static_layout(t):
    return None if t is None else StaticLayout(t)


_TRACEDPLANS: dict = {}  # functional.prepare looks plans up here itself: the hot path


def traced_plan(input, weight, bias, residual, running_mean, running_var, training, activation, counting=0):
    """The plan torch.compile's triton ops launch (no cooperative launch: see triton_ops.py), for checked
    arguments."""
    from . import kernels

    x, w, b, r, rm, rv = (static_layout(t) for t in (input, weight, bias, residual, running_mean, running_var))
    plan_key = key(x, w, b, r, rm, rv, training, activation, counting)
    plan = _TRACEDPLANS.get(plan_key)
    if plan is None:
        if len(_TRACEDPLANS) >= _MAXPLANS:
            _TRACEDPLANS.clear()
        plan = _TRACEDPLANS[plan_key] = kernels.ForwardPlan(x, w, b, r, rm, rv, training,
                                                             REGISTRY[activation].kernel_id, cooperative=False,
                                                             counting=counting)
        plan.activation = activation
    return plan
