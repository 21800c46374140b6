"""The plan cache: a call gets the plan made for tensors laid out as its own, never another call's.

``plans.lookup`` compares a call's tensors with those a plan was made for (PyTorch's ``TensorGuards``, in C++)
instead of building the call's key; where this PyTorch lacks them, the key is the look-up (``plans.keyed``).
Each variant below differs from a first call in one thing a plan depends on and must compute its own numbers,
on both look-ups. The backward half: the sums a backward writes into its forward's workspace.
"""

import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import plans

pytestmark = pytest.mark.kernels

SHAPE = (3, 6, 5, 4)


def _tensors(device, dtype=torch.float32):
    x = (torch.randn(SHAPE, device=device, dtype=torch.float64) * 2 + 1).to(dtype).requires_grad_()
    weight = (torch.rand(SHAPE[1], device=device) + 0.5).requires_grad_()
    bias = torch.randn(SHAPE[1], device=device).requires_grad_()
    running_mean, running_var = torch.randn(SHAPE[1], device=device), torch.rand(SHAPE[1], device=device) + 1
    return {"input": x, "weight": weight, "bias": bias, "residual": None, "running_mean": running_mean,
            "running_var": running_var}


def _strided(vector):
    """The same values, every other element of a buffer (stride 2)."""
    buffer = torch.full((2 * vector.numel(),), float("nan"), device=vector.device, dtype=vector.dtype)
    buffer[::2] = vector.detach()
    return buffer[::2].requires_grad_(vector.requires_grad)


VARIANTS = {
    "channels_last": lambda t: {**t, "input": t["input"].detach().contiguous(memory_format=torch.channels_last)
                                .requires_grad_()},
    "float64": lambda t: {**t, "input": t["input"].detach().double().requires_grad_()},
    "strided_weight": lambda t: {**t, "weight": _strided(t["weight"])},
    "strided_running_var": lambda t: {**t, "running_var": _strided(t["running_var"])},
    "no_weight": lambda t: {**t, "weight": None},
    "no_running_stats": lambda t: {**t, "running_mean": None, "running_var": None},
    "residual": lambda t: {**t, "residual": torch.randn(SHAPE, device=t["input"].device)},
    "input_as_residual": lambda t: {**t, "residual": t["input"]},  # one tensor in two places: guards refuse it
    "no_grad_input": lambda t: {**t, "input": t["input"].detach()},
    "parameter_weight": lambda t: {**t, "weight": torch.nn.Parameter(t["weight"].detach().clone())},
    "wider": lambda t: {**t, "input": torch.randn(3, 6, 5, 9, device=t["input"].device, requires_grad=True)},
}


def _check(tensors, training):
    """The fused identity op against float64 PyTorch: output, running statistics and every gradient."""
    wide = {name: None if t is None else t.detach().double().clone() for name, t in tensors.items()}
    if tensors["residual"] is tensors["input"]:
        wide["residual"] = wide["input"]
    names = [name for name in ("input", "weight", "bias") if tensors[name] is not None and tensors[name].requires_grad]
    for name in names:
        wide[name].requires_grad_()
    before = {name: tensors[name].clone() for name in ("running_mean", "running_var") if tensors[name] is not None}
    y = tritonbn.batch_norm_act(tensors["input"], tensors["running_mean"], tensors["running_var"], tensors["weight"],
                                tensors["bias"], training, 0.3, 1e-5, activation="identity",
                                residual=tensors["residual"])
    expected = F.batch_norm(wide["input"], wide["running_mean"], wide["running_var"], wide["weight"], wide["bias"],
                            training, 0.3, 1e-5)
    if wide["residual"] is not None:
        expected = expected + wide["residual"]
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    for name, old in before.items():  # updated in training (as the float64 copies were), untouched in eval
        torch.testing.assert_close(tensors[name].double(), wide[name], atol=1e-5, rtol=1e-5, msg=name)
        assert training != torch.equal(tensors[name], old), name
    if training and names:
        grad = torch.randn_like(y)
        actual = torch.autograd.grad(y, [tensors[name] for name in names], grad)
        wanted = torch.autograd.grad(expected, [wide[name] for name in names], grad.double())
        for name, a, b in zip(names, actual, wanted):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=name)


@pytest.fixture(params=["guards", "key"])
def lookup(request, monkeypatch):
    """Plans made anew, looked up by guards or, as on a PyTorch without TensorGuards, by the key."""
    monkeypatch.setattr(plans, "PLANS", {})
    if request.param == "key":
        monkeypatch.setattr(plans, "TensorGuards", None)
        monkeypatch.setattr(plans, "lookup", plans.keyed)
    return request.param


# Eval without running statistics is rejected, as by nn.BatchNorm (tests/api/test_bad_input.py).
CASES = [(variant, training) for variant in VARIANTS for training in (True, False)
         if training or variant != "no_running_stats"]


@pytest.mark.parametrize(("variant", "training"), CASES, ids=[f"{v}-{'training' if t else 'eval'}" for v, t in CASES])
def test_a_call_gets_the_plan_of_its_own_layouts(device, lookup, variant, training):
    first = _tensors(device)
    other = VARIANTS[variant](_tensors(device))
    for tensors in (first, other, first, other):  # each planned, then found again
        _check(tensors, training)
        args = [tensors[name] for name in ("input", "weight", "bias", "residual", "running_mean", "running_var")]
        own = plans.PLANS[plans.key(*args, training, "identity")]
        assert plans.lookup(*args, training, "identity") in (own, None)
    guards = [value for value in plans.PLANS.values() if isinstance(value, list)]
    assert (lookup == "key") == (not guards)
    assert all(len(candidates) <= plans._MAXGUARDS for candidates in guards)


def test_guards_find_the_plan_they_were_made_for(device):
    tensors = _tensors(device)
    _check(tensors, True)
    args = [tensors[name] for name in ("input", "weight", "bias", "residual", "running_mean", "running_var")]
    if plans.TensorGuards is None:
        pytest.skip("this PyTorch has no TensorGuards: the key is the look-up (test above)")
    assert plans.lookup(*args, True, "identity") is plans.PLANS[plans.key(*args, True, "identity")]


def test_a_non_tensor_is_named_after_its_layout_was_planned(device):
    tensors = _tensors(device)
    _check(tensors, True)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or None, got list"):
        tritonbn.batch_norm_act(tensors["input"], tensors["running_mean"], tensors["running_var"],
                                [1.0] * SHAPE[1], tensors["bias"], True)


@pytest.mark.parametrize("dy_layout", ["like_output", "expanded", "channels_last"])
def test_backward_sums_in_the_forward_workspace(device, dy_layout):
    """Where the gradient is laid out as the output, backward writes its sums after the forward's mean and rstd
    (one allocation less): those stay as they were, and a second backward of the same graph gives the same
    gradients as the first."""
    tensors = _tensors(device)
    x, weight, bias = tensors["input"], tensors["weight"], tensors["bias"]
    y = tritonbn.batch_norm_act(x, None, None, weight, bias, True, activation="identity")
    grad = {"like_output": torch.randn_like(y), "expanded": torch.randn(SHAPE[1], 1, 1, device=device).expand(SHAPE),
            "channels_last": torch.randn_like(y).contiguous(memory_format=torch.channels_last)}[dy_layout]
    statistics = y.grad_fn.stats[: 2 * SHAPE[1]].clone()
    first = torch.autograd.grad(y, (x, weight, bias), grad, retain_graph=True)
    torch.testing.assert_close(y.grad_fn.stats[: 2 * SHAPE[1]], statistics, atol=0, rtol=0)
    second = torch.autograd.grad(y, (x, weight, bias), grad)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    wide = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    reference = F.batch_norm(wide[0], None, None, wide[1], wide[2], True)
    for actual, wanted in zip(first, torch.autograd.grad(reference, wide, grad.double())):
        torch.testing.assert_close(actual.double(), wanted, atol=1e-4, rtol=1e-4)
    used = [plan for key, plan in y.grad_fn.plan.backward_plans.items() if key[0] == grad.stride()]
    assert len(used) == 1
    if dy_layout == "like_output":  # what the forward sized its workspace for
        assert used[0].sums_in_stats
