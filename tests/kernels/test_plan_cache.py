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


def _assert_batch_gradients(grads, x, weight, bias, grad, residual=None):
    """``grads`` of (x, weight, bias) are float64 PyTorch's for the training identity op with gradient ``grad``."""
    wide = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    reference = F.batch_norm(wide[0], None, None, wide[1], wide[2], True)
    if residual is not None:
        reference = reference + residual.double()
    for actual, wanted in zip(grads, torch.autograd.grad(reference, wide, grad.double())):
        torch.testing.assert_close(actual.double(), wanted, atol=1e-4, rtol=1e-4)


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
    _assert_batch_gradients(first, x, weight, bias, grad)
    used = [plan for key, plan in y.grad_fn.plan.backward_plans.items() if key[0] == grad.stride()]
    assert len(used) == 1
    if dy_layout == "like_output":  # what the forward sized its workspace for
        assert used[0].sums_in_stats


def _negated(t):
    """A view with the values of ``t`` that PyTorch negates as it reads it (``is_neg()``): its memory holds -t."""
    view = torch.complex(torch.zeros_like(t.detach()), -t.detach()).conj().imag
    assert view.is_neg() and torch.equal(view, t.detach())
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("which", ["input", "weight", "bias", "residual", "grad"])
def test_a_view_pytorch_negates_is_read_as_pytorch_reads_it(device, lookup, which):
    """The kernels read memory: a view whose memory holds its values' negatives (``z.conj().imag``) must not
    reach them as it is, with or without a plan for its layout (the guards tell such a view apart, the key does
    not)."""
    tensors = _tensors(device)
    tensors["residual"] = torch.randn(SHAPE, device=device)
    grad = torch.randn(SHAPE, device=device)
    _check(tensors, True)  # a plan for these layouts exists
    if which == "grad":
        grad = _negated(grad)
    else:
        tensors[which] = _negated(tensors[which])
    _check(tensors, True)
    x, weight, bias = tensors["input"], tensors["weight"], tensors["bias"]
    y = tritonbn.batch_norm_act(x, None, None, weight, bias, True, activation="identity", residual=tensors["residual"])
    _assert_batch_gradients(torch.autograd.grad(y, (x, weight, bias), grad), x, weight, bias, grad,
                            tensors["residual"])


def test_cpu_reference_holds_for_a_planned_layout(device, monkeypatch):
    """Inside ``cpu_reference()`` a CPU call runs the PyTorch reference even where its plan is cached."""
    from tritonbn import reference

    ran = []
    real = reference.batch_norm_act
    monkeypatch.setattr(reference, "batch_norm_act", lambda *args, **kwargs: ran.append(1) or real(*args, **kwargs))
    x = torch.randn(SHAPE, device=device)
    tritonbn.batch_norm_act(x, None, None, training=True)
    assert not ran
    with tritonbn.cpu_reference():
        tritonbn.batch_norm_act(x, None, None, training=True)
    assert ran == ([1] if device == "cpu" else [])


def test_the_custom_op_backward_keeps_to_the_mean_and_rstd(device):
    """torch.compile's backward op gets only the forward's mean and rstd (2 * C), which may be a buffer of their
    own: its plan allocates its sums rather than write past them."""
    tensors = _tensors(device)
    x, weight, bias = tensors["input"], tensors["weight"], tensors["bias"]
    output, stats = torch.ops.tritonbn.forward(x, weight, bias, None, None, None, None, True, 0.1, 1e-5, "identity",
                                               0.01)
    assert stats.numel() == 2 * SHAPE[1]
    holder = torch.full((stats.numel() + 256,), 7.0, device=device, dtype=stats.dtype)
    holder[: stats.numel()] = stats  # the mean and rstd, then memory that is not theirs
    grad = torch.randn_like(output)
    grads = torch.ops.tritonbn.backward(grad, x, holder[: stats.numel()], weight, bias, None, None, None, True, 1e-5,
                                        "identity", 0.01, [True, True, True, False])
    assert torch.equal(holder[stats.numel():], torch.full_like(holder[stats.numel():], 7.0))
    assert torch.equal(holder[: stats.numel()], stats)
    _assert_batch_gradients(grads[:3], x, weight, bias, grad)


def test_the_forward_sizes_its_workspace_for_the_backward(device, monkeypatch):
    """Where the backward's tiling has more splits than the forward's, the forward's workspace grows to hold the
    backward's sums; a backward whose tiling the forward did not size it for allocates its own. Both give
    PyTorch's gradients."""
    from tritonbn.kernels import backward, configs

    many_splits = configs.KernelConfig("ticket", 1, 1, 1)  # one row a tile: a split per row
    heuristic = backward.choose
    tensors = _tensors(device)
    x, weight, bias = tensors["input"], tensors["weight"], tensors["bias"]
    for sized in (True, False):
        tritonbn.plans.clear()
        # The forward plan made while the backward's tiling has many splits, or the usual few; the backward's then
        # made with many.
        monkeypatch.setattr(backward, "choose", (lambda *args: many_splits) if sized else heuristic)
        y = tritonbn.batch_norm_act(x, None, None, weight, bias, True, activation="identity")
        monkeypatch.setattr(backward, "choose", lambda *args: many_splits)
        forward = y.grad_fn.plan
        grad = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, weight, bias), grad)
        (used,) = forward.backward_plans.values()
        assert used.tiling.num_splits > forward.tiling.num_splits
        assert used.sums_in_stats == sized
        assert (forward.workspace_numel > 2 * SHAPE[1] + 4 * forward.tiling.num_splits * SHAPE[1]) == sized
        _assert_batch_gradients(grads, x, weight, bias, grad)
