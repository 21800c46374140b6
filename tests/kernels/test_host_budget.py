"""Host work per call, counted: kernel launches and dispatched PyTorch ops (views and allocations count).

Budgets: training forward at most 2 launches and 2 ops (the output and the workspace), backward at most 2
launches and 3 ops (the three gradients: its sums go into the forward's workspace where the gradient is laid out
as the output), eval exactly 1 launch and 1 op; a residual may add one op per direction (its output or
gradient). Timings stay out of
tests: this counts the work, ../shared/tools/hostcost.py times it. Launches are counted at the interpreter's
grid executor on a CPU and by the profiler's kernel events on CUDA, so every kernel counts, PyTorch's too.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import tritonbn

BUDGETS = {"forward": (2, 2), "backward": (2, 3), "eval": (1, 1)}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def count(fn, device, monkeypatch):
    """(kernel launches, PyTorch ops) of one call of ``fn``, after a first call that plans and compiles."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, OpCounter() as ops:
            fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(kernels), ops.ops
    import triton.runtime.interpreter as interpreter

    launched = []
    run = interpreter.GridExecutor.__call__

    def counting(self, *args, **kwargs):
        launched.append(1)
        with _disable_current_modes():  # the interpreter's own copies are not the call's host work
            return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counting)
    with OpCounter() as ops:
        fn()
    return len(launched), ops.ops


def make(device, residual, dtype=torch.float32):
    x = torch.randn(3, 8, 5, 7, device=device, dtype=dtype, requires_grad=True)
    weight = torch.rand(8, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True) if residual else None
    return x, weight, bias, r, torch.randn(8, device=device), torch.rand(8, device=device) + 0.5


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_training_forward_and_backward_within_budget(device, monkeypatch, residual, activation, memory_format):
    x, weight, bias, r, running_mean, running_var = make(device, residual)
    x = x.detach().to(memory_format=memory_format).requires_grad_()
    inputs = (x, weight, bias) if r is None else (x, weight, bias, r)
    extra = 1 if residual else 0

    def forward():
        return tritonbn.batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5,
                                       activation=activation, residual=r)

    launches, ops = count(forward, device, monkeypatch)
    assert launches <= BUDGETS["forward"][0], ops
    assert len(ops) <= BUDGETS["forward"][1] + extra, ops

    grad = torch.randn_like(x)
    y = forward()
    launches, ops = count(lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True), device, monkeypatch)
    assert launches <= BUDGETS["backward"][0], ops
    assert len(ops) <= BUDGETS["backward"][1] + extra, ops


@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_eval_is_one_launch_and_one_op(device, monkeypatch, residual):
    x, weight, bias, r, running_mean, running_var = make(device, residual)

    def forward():
        with torch.no_grad():
            return tritonbn.batch_norm_act(x, running_mean, running_var, weight, bias, False, residual=r)

    launches, ops = count(forward, device, monkeypatch)
    assert launches == BUDGETS["eval"][0], ops
    assert len(ops) == BUDGETS["eval"][1], ops


def test_the_counter_sees_extra_work(device, monkeypatch):
    """The budgets can fail: the same call plus one more op and launch is counted as such."""
    x, weight, bias, _, running_mean, running_var = make(device, False)

    def forward():
        with torch.no_grad():
            y = tritonbn.batch_norm_act(x, running_mean, running_var, weight, bias, False)
            return tritonbn.batch_norm_act(y.add(1.0), running_mean, running_var, weight, bias, False)

    launches, ops = count(forward, device, monkeypatch)
    assert launches >= 2 + (device == "cuda") and len(ops) == 3, ops
