"""The kernels' forward plans, cached per specialization: shapes, strides, dtypes and devices of a call's
tensors and its options. ``functional.prepare`` checks a call's arguments before planning it, so a cached
plan also means its arguments were checked; the custom ops (``ops.py``) plan arguments already checked.
"""

import torch

from .activations import REGISTRY

_PLANS: dict = {}
_MAX_PLANS = 4096  # distinct specializations; a program that keeps making new shapes just re-plans


def _layout(t):
    return None if t is None else (t.dtype, t.shape, t.stride(), t.device)


def key(input, weight, bias, residual, running_mean, running_var, training, activation, cumulative=False) -> tuple:
    """What a plan (and the checks of its arguments) depends on; ``cumulative``: momentum=None's factor."""
    return (input.shape, input.stride(), input.dtype, input.device, _layout(weight), _layout(bias),
            _layout(residual), _layout(running_mean), _layout(running_var), training, activation, cumulative)


def cached(plan_key: tuple):
    return _PLANS.get(plan_key)


def new(plan_key, input, weight, bias, residual, running_mean, running_var, training, activation, cumulative=False):
    """Plan a call (its tensors define the layouts and tiling) and cache the plan under ``plan_key``."""
    from . import kernels  # Triton is imported when a kernel is first planned, not with tritonbn

    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    plan = _PLANS[plan_key] = kernels.ForwardPlan(input, weight, bias, residual, running_mean, running_var, training,
                                                  REGISTRY[activation].kernel_id, cumulative=cumulative)
    plan.activation = activation  # the name, for double backward's PyTorch recomputation
    return plan


def plan_for(input, weight, bias, residual, running_mean, running_var, training, activation, cumulative=False):
    """The cached plan for arguments already checked."""
    plan_key = key(input, weight, bias, residual, running_mean, running_var, training, activation, cumulative)
    return cached(plan_key) or new(plan_key, input, weight, bias, residual, running_mean, running_var, training,
                                   activation, cumulative)


def clear() -> None:
    """Forget every plan, eager's and torch.compile's (a configuration override, say, should take effect for
    shapes planned already)."""
    _PLANS.clear()
    _TRACED_PLANS.clear()


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


_TRACED_PLANS: dict = {}


def traced_plan(input, weight, bias, residual, running_mean, running_var, training, activation, cumulative=False):
    """The plan torch.compile's triton ops launch (no cooperative launch: see triton_ops.py), for checked
    arguments."""
    from . import kernels

    x, w, b, r, rm, rv = (static_layout(t) for t in (input, weight, bias, residual, running_mean, running_var))
    plan_key = key(x, w, b, r, rm, rv, training, activation, cumulative)
    plan = _TRACED_PLANS.get(plan_key)
    if plan is None:
        if len(_TRACED_PLANS) >= _MAX_PLANS:
            _TRACED_PLANS.clear()
        plan = _TRACED_PLANS[plan_key] = kernels.ForwardPlan(x, w, b, r, rm, rv, training,
                                                             REGISTRY[activation].kernel_id, cooperative=False,
                                                             cumulative=cumulative)
        plan.activation = activation
    return plan
