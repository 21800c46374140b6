"""Paths a PyTorch user takes through BN + activation, and what tritonbn does on each: input checks PyTorch
makes, torch.func transforms, forward-mode AD, torch.jit.trace and torch.compile of permuted inputs."""

import copy

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn import validation


def pair(device, dtype=torch.float64):
    """A fused module and the nn.BatchNorm2d + ReLU it replaces, with the same non-trivial state."""
    plain = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()).to(device, dtype)
    with torch.no_grad():
        plain[0].weight.uniform_(0.5, 2.0)
        plain[0].bias.normal_()
        plain[0].running_mean.normal_()
        plain[0].running_var.uniform_(0.5, 2.0)
    fused = tritonbn.BatchNormAct2d(4, device=device, dtype=dtype)
    fused.load_state_dict(plain[0].state_dict())
    return fused, plain


@pytest.mark.parametrize("training,eps", [(True, 0.0), (True, -1e-5), (False, 0.0), (False, -1e-5)])
def test_non_positive_eps_behaves_as_pytorch_does_before_any_state_changes(device, training, eps):
    """Rejected with PyTorch's exact error, before anything changes, wherever the installed PyTorch rejects it
    (releases differ: 2.11 also rejects eps == 0 in eval); computed as PyTorch computes it where it does not."""
    fused, plain = pair(device)
    fused.eps = plain[0].eps = eps
    fused.train(training)
    plain.train(training)
    x = torch.randn(3, 4, 5, 5, device=device, dtype=torch.float64)
    try:
        expected = plain(x)
    except Exception as error:
        state = copy.deepcopy(fused.state_dict())
        with pytest.raises(type(error)) as got:
            fused(x)
        assert str(got.value) == str(error)
        torch.testing.assert_close(fused.state_dict(), state)  # num_batches_tracked included
    else:
        torch.testing.assert_close(fused(x), expected)


def test_eps_errors_are_learnt_from_the_installed_pytorch(device, monkeypatch):
    """A PyTorch that words or draws the line differently (torch 2.11: "batch_norm eps must be positive, but got
    0.0", in eval too) is followed, not the release this was written against."""
    def batch_norm_of_torch_2_11(input, running_mean, running_var, weight=None, bias=None, training=False,
                                 momentum=0.1, eps=1e-5):
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
        return torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, False)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", batch_norm_of_torch_2_11)
    validation._torch_eps_error.cache_clear()
    try:
        fused, _ = pair(device)
        fused.eps = 0.0
        state = copy.deepcopy(fused.state_dict())
        with pytest.raises(ValueError, match=r"^batch_norm eps must be positive, but got 0\.0$"):
            fused.eval()(torch.randn(3, 4, 5, 5, device=device, dtype=torch.float64))
        torch.testing.assert_close(fused.state_dict(), state)
    finally:
        validation._torch_eps_error.cache_clear()


@pytest.mark.parametrize("residual", [1.0, [1.0, 2.0], "x"])
def test_non_tensor_residual_names_the_residual(device, residual):
    fused, _ = pair(device)
    state = copy.deepcopy(fused.state_dict())
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        fused(torch.randn(3, 4, 5, 5, device=device, dtype=torch.float64), residual)
    torch.testing.assert_close(fused.state_dict(), state)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_input_is_not_implemented_and_changes_nothing(device, dtype):
    fused, _ = pair(device, torch.float32)
    state = copy.deepcopy(fused.state_dict())
    x = torch.randn(3, 4, 5, 5, device=device).to(dtype)
    with pytest.raises(NotImplementedError):
        fused(x)
    torch.testing.assert_close(fused.state_dict(), state)


def _eval_and_stateless(device):
    """The two settings where PyTorch's own BN + ReLU supports torch.func: eval, and training without
    running statistics."""
    fused, plain = pair(device)
    yield "eval", fused.eval(), plain.eval()
    fused, plain = pair(device)
    fused.track_running_stats = plain[0].track_running_stats = False
    fused.running_mean = fused.running_var = plain[0].running_mean = plain[0].running_var = None
    yield "train", fused.train(), plain.train()


def test_torch_func_transforms(device):
    x = torch.randn(3, 4, 2, 3, device=device, dtype=torch.float64)
    for _, fused, plain in _eval_and_stateless(device):
        params = {name: p.detach() for name, p in plain[0].named_parameters()}

        def loss(module, prefix):
            return lambda parameters, x: torch.func.functional_call(
                module, {f"{prefix}{k}": v for k, v in parameters.items()}, (x,)).square().sum()

        torch.testing.assert_close(torch.func.grad(loss(fused, ""))(params, x),
                                   torch.func.grad(loss(plain, "0."))(params, x))
        tangent = torch.randn_like(x)
        torch.testing.assert_close(torch.func.jvp(fused, (x,), (tangent,)), torch.func.jvp(plain, (x,), (tangent,)))
        torch.testing.assert_close(torch.func.jacrev(fused)(x[:2]), torch.func.jacrev(plain)(x[:2]))
        if not fused.training:  # vmap over samples of an eval-mode BN, as in per-sample gradients
            batched = x.unsqueeze(1)
            torch.testing.assert_close(torch.func.vmap(fused)(batched), torch.func.vmap(plain)(batched))


def test_forward_mode_ad_with_dual_tensors(device):
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(3, 4, 2, 3, device=device, dtype=torch.float64)
    tangent = torch.randn_like(x)
    for _, fused, plain in _eval_and_stateless(device):
        results = []
        for module in (fused, plain):
            with fwAD.dual_level():
                out = fwAD.unpack_dual(module(fwAD.make_dual(x, tangent)))
                results.append((out.primal, out.tangent))
        torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace(device, training):
    fused, plain = pair(device)
    fused.train(training)
    plain.train(training)
    x = torch.randn(3, 4, 5, 5, device=device, dtype=torch.float64)
    traced = torch.jit.trace(copy.deepcopy(fused), x, check_trace=False)
    expected = plain(x)
    torch.testing.assert_close(traced(x), expected)
    other = torch.randn(6, 4, 3, 3, device=device, dtype=torch.float64)  # another shape through the trace
    torch.testing.assert_close(traced(other), plain(other))


def test_compile_of_a_permuted_input(device):
    """A dense but permuted input (spatial dims swapped) is copied by the kernel path: the fake
    implementation must promise the strides the kernel path returns, or inductor's stride check fires."""
    torch._dynamo.reset()
    fused, plain = pair(device)
    compiled = torch.compile(lambda x: fused(x.transpose(2, 3)), fullgraph=True)
    x = torch.randn(3, 4, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    y = compiled(x)
    fused_eager, _ = pair(device)
    fused_eager.load_state_dict(plain[0].state_dict())
    x_eager = x.detach().clone().requires_grad_()
    expected = plain(x_eager.transpose(2, 3))
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad), torch.autograd.grad(expected, x_eager, grad))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_of_the_custom_ops(device, training):
    """torch.library.opcheck: fake and real implementations agree (strides included) on every layout."""
    from tritonbn import ops

    x = torch.randn(3, 4, 5, 6, device=device, dtype=torch.float64)
    checks = ("test_schema", "test_faketensor")
    for layout in (x, x.transpose(2, 3), x.to(memory_format=torch.channels_last), x[:, :, ::2]):
        weight = torch.rand(4, device=device, dtype=torch.float64)
        bias = torch.randn(4, device=device, dtype=torch.float64)
        residual = torch.randn_like(layout)
        running = (torch.randn(4, device=device, dtype=torch.float64),
                   torch.rand(4, device=device, dtype=torch.float64) + 0.5)
        args = (layout, weight, bias, residual, *running, None, training, 0.1, 1e-5, "silu", 0.01)
        torch.library.opcheck(ops.forward, args, test_utils=checks)
        batches = torch.tensor(3, device=device)  # momentum=None: the factor 1 / num_batches_tracked
        torch.library.opcheck(ops.forward, (*args[:6], batches, *args[7:]), test_utils=checks)
        _, stats = ops.forward(*args)
        grad = torch.randn_like(layout).transpose(0, 1).contiguous().transpose(0, 1)  # another layout than y's
        torch.library.opcheck(ops.backward, (grad, layout, stats, weight, bias, residual, *running, training, 1e-5,
                                             "silu", 0.01, [True, True, True, True]), test_utils=checks)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
def test_double_backward_matches_pytorch(device, training, with_residual):
    """create_graph=True through the fused op (a gradient penalty): first and second derivatives as
    PyTorch's BN + SiLU, for the input, the parameters and the residual."""
    x = torch.randn(3, 4, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, device=device, dtype=torch.float64).add(0.5).requires_grad_()
    bias = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True) if with_residual else None
    running = (torch.randn(4, device=device, dtype=torch.float64), torch.rand(4, device=device, dtype=torch.float64)
               + 0.5)
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    grad = torch.randn_like(x)

    def penalty(fused):
        mean, var = (t.clone() for t in running)
        if fused:
            y = tritonbn.batch_norm_act(x, mean, var, weight, bias, training, activation="silu", residual=residual)
        else:
            z = torch.nn.functional.batch_norm(x, mean, var, weight, bias, training)
            y = torch.nn.functional.silu(z if residual is None else z + residual)
        first = torch.autograd.grad(y, inputs, grad, create_graph=True)
        return first, torch.autograd.grad(sum(g.square().sum() for g in first), inputs)

    got, expected = penalty(True), penalty(False)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_per_channel_tensors(device, training):
    """Weight, bias and running statistics that are views with a stride (every other element of a buffer),
    in the forward, the running-statistics update and every gradient."""
    buffers = [torch.randn(8, device=device, dtype=torch.float64) for _ in range(4)]
    buffers[1].uniform_(0.5, 2.0)
    buffers[3].uniform_(0.5, 2.0)
    weight, bias = (b[::2].detach().clone().requires_grad_() for b in buffers[:2])
    weight_view = torch.zeros(8, device=device, dtype=torch.float64)
    weight_view[::2] = weight.detach()
    weight_view = weight_view[::2].requires_grad_()
    running_mean, running_var = buffers[2][::2], buffers[3][::2]
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    x = torch.randn(3, 4, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    y = tritonbn.batch_norm_act(x, running_mean, running_var, weight_view, bias, training)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.relu(torch.nn.functional.batch_norm(x_ref, expected_mean, expected_var, weight, bias, training))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close((running_mean, running_var), (expected_mean, expected_var))
    grad = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (x, weight_view, bias), grad),
                               torch.autograd.grad(y_ref, (x_ref, weight, bias), grad))
