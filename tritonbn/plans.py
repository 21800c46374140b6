"""The kernels' forward plans, cached per specialization: shapes, strides, dtypes and devices of a call's
tensors and its options. ``functional.prepare`` checks a call's arguments before planning it, so a cached
plan also means its arguments were checked; the custom ops (``ops.py``) plan arguments already checked.
"""

from .activations import REGISTRY

_PLANS: dict = {}
_MAX_PLANS = 4096  # distinct specializations; a program that keeps making new shapes just re-plans


def _layout(t):
    return None if t is None else (t.dtype, t.shape, t.stride(), t.device)


def key(input, weight, bias, residual, running_mean, running_var, training, activation) -> tuple:
    """What a plan (and the checks of its arguments) depends on."""
    return (input.shape, input.stride(), input.dtype, input.device, _layout(weight), _layout(bias),
            _layout(residual), _layout(running_mean), _layout(running_var), training, activation)


def cached(plan_key: tuple):
    return _PLANS.get(plan_key)


def new(plan_key, input, weight, bias, residual, running_mean, training, activation):
    """Plan a call (its tensors define the layouts and tiling) and cache the plan under ``plan_key``."""
    from . import kernels  # Triton is imported when a kernel is first planned, not with tritonbn

    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    plan = _PLANS[plan_key] = kernels.ForwardPlan(input, weight, bias, residual, running_mean, training,
                                                  REGISTRY[activation].kernel_id)
    return plan


def plan_for(input, weight, bias, residual, running_mean, running_var, training, activation):
    """The cached plan for arguments already checked."""
    plan_key = key(input, weight, bias, residual, running_mean, running_var, training, activation)
    return cached(plan_key) or new(plan_key, input, weight, bias, residual, running_mean, training, activation)
