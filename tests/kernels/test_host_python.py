"""The Python a call runs in tritonbn's own code, counted: function calls and source lines executed, by a tracer,
after a first call that plans. This is the host path's budget (issue 28): a change that adds Python to every call
of every layer fails here with the counts to look at, where a timing would drown in noise. When a change lowers
them, lower the budgets with it.

Counted where the kernels are interpreted (a CPU): the plans are the same on CUDA, where the launches take the
direct path instead (launch.launch_all's other branch) and the launch counts of test_host_budget.py apply.
"""

import collections
import os
import sys

import pytest
import torch

import tritonbn
import tritonbn.kernels
from tritonbn.backend import kernels_interpreted

# (calls, lines) per call, after the first; Python 3.11, where CI runs.
BUDGETS = {
    "training forward + backward": (12, 109),
    "training forward + backward, residual": (12, 109),
    "module training forward + backward": (14, 127),
    "eval forward": (7, 59),
}
ROOTS = tuple(os.path.dirname(module.__file__) + os.sep for module in (tritonbn, tritonbn.kernels))

pytestmark = pytest.mark.skipif(not kernels_interpreted(), reason="counted where the kernels are interpreted")


@pytest.fixture(autouse=True)
def launches_skipped(monkeypatch):
    """The interpreter runs a launch's kernel as Python in tritonbn's own files: launches are skipped whole (as
    ../shared/tools/hostcost.py skips them), so what is counted is the host's work around them. A plan binds
    its kernels' launch when it is made: plans are made anew inside, and forgotten after."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    tritonbn.plans.clear()
    yield
    tritonbn.plans.clear()


def python_work(fn, roots=ROOTS) -> tuple[int, int, collections.Counter]:
    """(calls, lines, lines per function) that one call of ``fn`` runs in the files under ``roots`` (tritonbn's own),
    after a first call."""
    fn()
    lines = collections.Counter()
    calls = []

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.startswith(roots):
            return None
        name = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
        calls.append(name)

        def local(frame, event, arg):
            if event == "line":
                lines[name] += 1
            return local

        return local

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return len(calls), sum(lines.values()), lines


def _calls():
    x = torch.randn(3, 8, 5, 7, requires_grad=True)
    weight, bias = torch.rand(8, requires_grad=True), torch.randn(8, requires_grad=True)
    running_mean, running_var = torch.randn(8), torch.rand(8) + 0.5
    residual = torch.randn_like(x, requires_grad=True)
    grad = torch.randn_like(x)
    module = tritonbn.BatchNormAct2d(8)

    def training(r=None):
        inputs = (x, weight, bias) if r is None else (x, weight, bias, r)
        y = tritonbn.batch_norm_act(x, running_mean, running_var, weight, bias, True, residual=r)
        torch.autograd.grad(y, inputs, grad)

    def module_training():
        torch.autograd.grad(module(x), (x, module.weight, module.bias), grad)

    def evaluation():
        with torch.no_grad():
            tritonbn.batch_norm_act(x, running_mean, running_var, weight, bias, False)

    return {"training forward + backward": training,
            "training forward + backward, residual": lambda: training(residual),
            "module training forward + backward": module_training,
            "eval forward": evaluation}


@pytest.mark.parametrize("name", list(BUDGETS))
def test_python_per_call_within_budget(name):
    calls, lines, per_function = python_work(_calls()[name])
    budget_calls, budget_lines = BUDGETS[name]
    assert calls <= budget_calls and lines <= budget_lines, (calls, lines, dict(per_function))


def test_the_tracer_sees_added_python(monkeypatch):
    """The budgets can fail: one more Python function on the path is counted, its call and its lines (this file
    counted as tritonbn's, where the added function lives)."""
    from tritonbn.kernels import forward

    call = forward.ForwardPlan.__call__

    def with_a_check(self, *args, **kwargs):
        assert self is not None
        return call(self, *args, **kwargs)

    evaluation = _calls()["eval forward"]
    roots = (*ROOTS, os.path.abspath(__file__))
    before = python_work(evaluation, roots)
    monkeypatch.setattr(forward.ForwardPlan, "__call__", with_a_check)
    after = python_work(evaluation, roots)
    assert after[0] == before[0] + 1 and after[1] == before[1] + 2
