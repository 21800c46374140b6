"""The kernels' forward plans, cached per specialization: shapes, strides, dtypes and devices of a call's
tensors and its options. ``functional.prepare`` checks a call's arguments before planning it, so a cached
plan also means its arguments were checked; the custom ops (``ops.py``) plan arguments already checked.

A call finds its plan (``lookup``) without building the whole key: ``PLANS`` also maps the input's shape, which
tensors are None and the options to the (guard, plan) pairs made for them, and a guard compares the call's
tensors with those the plan was made for in C++ (PyTorch's own ``TensorGuards``, which torch.compile checks its
graphs' inputs with: type, dispatch keys, dtype, device, requires_grad, sizes and strides): 0.9 us a look-up
where building, hashing and finding the key costs 2.1 (measured on a CPU, perf/notes.md). A guard asks more
than the key (requires_grad, Parameter or Tensor), so one plan may have a guard for each such variant. Where
this PyTorch lacks ``TensorGuards``, the look-up builds the key.
"""

import torch

from .activations import REGISTRY

try:  # a PyTorch internal; the key is the fallback
    from torch._C._dynamo.guards import TensorGuards
except ImportError:  # pragma: no cover - every PyTorch this package supports has it
    TensorGuards = None

PLANS: dict = {}  # plans by key, and (guard, plan) lists by guard_key: functional.prepare's hot path
_MAXPLANS = 4096  # distinct specializations; a program that keeps making new shapes just re-plans
_MAXGUARDS = 8  # guards tried per guard key; beyond them a call is looked up by its key
_ABSENT = _NO_WEIGHT, _NO_BIAS, _NO_RESIDUAL, _NO_MEAN, _NO_VAR = tuple(torch.empty(0) for _ in range(5))


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


def guard_key(input, weight, bias, residual, running_mean, running_var, training, activation, counting) -> tuple:
    """What ``guarded`` looks a call's guards up by (it builds the same tuple inline: the hot path): nine items, so
    that it never equals a ``key`` (twelve)."""
    return (input.shape, weight is None, bias is None, residual is None, running_mean is None, running_var is None,
            training, activation, counting)


def guarded(input, weight, bias, residual, running_mean, running_var, training, activation, counting=0):
    """The cached plan made for tensors with these tensors' layouts (see the module docstring), or None. A None
    tensor's place in a guard holds a tensor of its own (a guard refuses one tensor in two places), which only
    it matches, as None matches only None: which ones are None is part of the guard key."""
    candidates = PLANS.get((input.shape, weight is None, bias is None, residual is None, running_mean is None,
                            running_var is None, training, activation, counting))
    if candidates is not None:
        for guard, plan in candidates:
            if guard.check(input, _NO_WEIGHT if weight is None else weight, _NO_BIAS if bias is None else bias,
                           _NO_RESIDUAL if residual is None else residual,
                           _NO_MEAN if running_mean is None else running_mean,
                           _NO_VAR if running_var is None else running_var):
                return plan
    return None


def keyed(input, weight, bias, residual, running_mean, running_var, training, activation, counting=0):
    """``guarded`` where this PyTorch has no ``TensorGuards``: the plan under the call's key, or None (for a
    ``negated`` tensor too, which the guards tell apart and the key does not)."""
    plan_key = key(input, weight, bias, residual, running_mean, running_var, training, activation, counting)
    return None if negated(input, weight, bias, residual, running_mean, running_var) else PLANS.get(plan_key)


def negated(*tensors) -> bool:
    """Whether a tensor is a view whose values PyTorch negates as it reads them (``is_neg()``: the imaginary part
    of a conjugate, ``z.conj().imag``): its memory holds the values' negatives, and the kernels read memory, so
    such a call runs the PyTorch reference, which reads it as PyTorch does."""
    return any(t is not None and t.is_neg() for t in tensors)


lookup = keyed if TensorGuards is None else guarded


def guard(plan, input, weight, bias, residual, running_mean, running_var, training, activation, counting=0) -> None:
    """Let ``lookup`` find ``plan`` for tensors like these (whose arguments were checked) from now on."""
    if TensorGuards is None:
        return
    candidates = PLANS.setdefault(guard_key(input, weight, bias, residual, running_mean, running_var, training,
                                            activation, counting), [])
    if len(candidates) < _MAXGUARDS:
        tensors = [absent if t is None else t for t, absent in zip((input, weight, bias, residual, running_mean,
                                                                     running_var), (None, *_ABSENT))]
        check = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                             dynamic_dims_strides=[list(t.stride()) for t in tensors])
        candidates.append((check, plan))


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
    guard(plan, input, weight, bias, residual, running_mean, running_var, training, activation, counting)
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
