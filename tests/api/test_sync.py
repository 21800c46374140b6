"""SyncBatchNormAct in one process: its synchronized op in a gloo group of one against float64 batch norm, its
collectives and the absence of host syncs counted, its torch.compile trace, and the module and conversion
outside a group. Groups of several processes (uneven and empty ranks, DDP): tests/distributed.

The synchronized op runs every piece and both collectives in a group of one too (the module itself computes
what BatchNormAct does there, as nn.SyncBatchNorm does), so everything but the merge across ranks is checked
here, on the kernels (interpreted) and, under --reference-path, on the PyTorch pieces.
"""

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _helpers import TORCH_ACTIVATIONS, GraphRecorder
from functorch.compile import make_boxed_compiler
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import tritonbn
from tritonbn.sync import sync_batch_norm_act


@pytest.fixture
def group_of_one():
    """A gloo process group of this process alone, the world while the test runs."""
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def expected(x, residual, weight, bias, running_mean, running_var, factor, activation, slope=0.2, eps=1e-5):
    """float64 F.batch_norm + residual + activation; updates the running statistics given."""
    z = F.batch_norm(x.double(), running_mean, running_var, weight.double(), bias.double(), True, factor, eps)
    return TORCH_ACTIVATIONS[activation](z if residual is None else z + residual.double(), slope)


def strided_vector(values, step=3):
    """``values`` held every ``step``-th element of a longer tensor: a per-channel tensor with a stride."""
    holder = torch.full((values.numel() * step,), float("nan"), dtype=values.dtype)
    holder[::step] = values
    return holder[::step]


# (activation, residual, momentum, shape, x's layout, dtype, mean offset)
CASES = [
    ("relu", True, 0.1, (5, 3, 4, 4), "channels_last", torch.float64, 0.0),
    ("leaky_relu", False, None, (6, 5), "contiguous", torch.float64, 0.0),
    ("silu", True, 1.0, (4, 3, 7), "transposed", torch.float64, 0.0),
    ("gelu", False, 0.3, (8, 3, 3, 3), "contiguous", torch.float32, 1e4),  # float32 at a mean far from 0
]


def _arranged(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # spatial dims that do not collapse to one stride: read through a copy
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_group_of_one_matches_batch_norm(group_of_one, case):
    activation, with_residual, momentum, shape, layout, dtype, offset = case
    channels = shape[1]
    x = _arranged(torch.randn(shape, dtype=torch.float64) * 2 + offset, layout).to(dtype).requires_grad_()
    residual = torch.randn(shape, dtype=dtype).requires_grad_() if with_residual else None
    weight = (torch.rand(channels, dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(channels, dtype=dtype).requires_grad_()
    running_mean = strided_vector(torch.randn(channels, dtype=dtype))  # per-channel tensors with strides
    running_var = strided_vector(torch.rand(channels, dtype=dtype) + 0.5, step=2)
    want_mean, want_var = running_mean.double(), running_var.double()
    batches = torch.tensor(3)  # momentum=None: the factor is 1 / num_batches_tracked, read on the device
    y = sync_batch_norm_act(x, running_mean, running_var, weight, bias, batches if momentum is None else momentum,
                            activation=activation, negative_slope=0.2, residual=residual)
    dy = _arranged(torch.randn(shape, dtype=dtype), "transposed")
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)

    double_inputs = [t.detach().double().requires_grad_() for t in inputs]
    double_x, double_residual = double_inputs[0], double_inputs[1] if with_residual else None
    want = expected(double_x, double_residual, *double_inputs[-2:], want_mean, want_var,
                    1 / 3 if momentum is None else momentum, activation)
    want_grads = torch.autograd.grad(want, double_inputs, dy.double())
    if dtype == torch.float64:
        torch.testing.assert_close([y, *grads, running_mean, running_var], [want, *want_grads, want_mean, want_var],
                                   rtol=1e-9, atol=1e-9)
        return
    # float32 at a large mean: as precise as the single-process op (whose float32 mean rounds as this one's).
    single_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    single = tritonbn.batch_norm_act(single_inputs[0], torch.zeros_like(running_mean), torch.ones_like(running_var),
                                     *single_inputs[-2:], True, momentum, activation=activation, negative_slope=0.2,
                                     residual=single_inputs[1] if with_residual else None)
    single_grads = torch.autograd.grad(single, single_inputs, dy)
    torch.testing.assert_close([running_mean.double(), running_var.double()], [want_mean, want_var], rtol=1e-5,
                               atol=1e-5)
    for got, one_process, wanted in zip([y, *grads], [single, *single_grads], [want, *want_grads]):
        error = (got.double() - wanted).abs().max()
        assert error <= 2 * (one_process.double() - wanted).abs().max() + 1e-5


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_group_of_one_keeps_nan_and_inf(group_of_one):
    """A NaN or an inf in a channel reaches that channel's output and statistics, as in PyTorch's batch norm."""
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    x[2, 0, 1] = float("nan")
    x[4, 1, 3] = float("inf")
    running = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    want_running = [t.clone() for t in running]
    y = sync_batch_norm_act(x, *running, activation="identity")
    want = F.batch_norm(x, *want_running, training=True, momentum=0.1)
    torch.testing.assert_close(y, want, equal_nan=True)
    torch.testing.assert_close(running, want_running, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_group_of_one_value_per_channel(group_of_one):
    """No rank can know on the host that the group holds one value per channel: nothing raises, the variance is
    0 and the unbiased running variance 0 / 0, as nn.SyncBatchNorm's in a group; an empty group changes
    nothing."""
    bias = torch.randn(3, dtype=torch.float64)
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x = torch.randn(1, 3, dtype=torch.float64)
    y = sync_batch_norm_act(x, running_mean, running_var, torch.ones(3, dtype=torch.float64), bias,
                            activation="identity")
    torch.testing.assert_close(y, bias[None])
    torch.testing.assert_close(running_mean, 0.1 * x[0])
    assert running_var.isnan().all()
    before = running_mean.clone()
    empty = sync_batch_norm_act(torch.empty(0, 3, 5, dtype=torch.float64), running_mean, running_var)
    assert empty.shape == (0, 3, 5)
    torch.testing.assert_close(running_mean, before)


class HostSyncs(TorchDispatchMode):
    """Counts functional collectives by name, and fails on anything that reads a tensor's value on the host:
    ``.item()``, ``.tolist()``, ``int()``, ``bool()`` (all aten._local_scalar_dense) and copies to the CPU of
    tensors elsewhere."""

    def __init__(self):
        super().__init__()
        self.collectives = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        namespace, _, op = name.partition("::")
        if namespace == "_c10d_functional" and op != "wait_tensor" and not op.startswith("_"):
            self.collectives.append(op)  # (torch 2.13 wraps gathers for autograd in an op, _wrap_tensor_autograd)
        assert func is not torch.ops.aten._local_scalar_dense.default, "a tensor's value was read on the host"
        if func is torch.ops.aten._to_copy.default:
            source = args[0].device.type
            assert kwargs.get("device", args[0].device).type == source or source == "cpu", "copied to the host"
        return func(*args, **kwargs)


def test_group_of_one_reads_negated_views_as_pytorch_does(group_of_one):
    """A view whose memory holds its values' negatives (``z.conj().imag``, ``is_neg()``), as input or as the
    upstream gradient, is read as PyTorch reads it."""
    values = torch.randn(6, 3, 4, dtype=torch.float64) * 2 + 1
    x = torch.complex(torch.zeros_like(values), -values).conj().imag.requires_grad_()
    grad = torch.randn_like(values)
    negated_grad = torch.complex(torch.zeros_like(grad), -grad).conj().imag
    assert x.is_neg() and negated_grad.is_neg()
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    plain = values.clone().requires_grad_()
    want = F.batch_norm(plain, None, None, weight, bias, True)
    (want_dx,) = torch.autograd.grad(want, plain, grad)
    y = sync_batch_norm_act(x, None, None, weight, bias, activation="identity")
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(torch.autograd.grad(y, x, negated_grad)[0], want_dx)
    y = sync_batch_norm_act(plain, None, None, weight, bias, activation="identity")
    torch.testing.assert_close(torch.autograd.grad(y, plain, negated_grad)[0], want_dx)


def test_one_collective_each_way_and_no_host_sync(group_of_one, monkeypatch):
    for method in ("item", "tolist", "cpu", "numpy"):  # the readings TorchDispatchMode does not see on a CPU
        monkeypatch.setattr(torch.Tensor, method, lambda *args, m=method, **kwargs: pytest.fail(f".{m}() called"))
    layer_state = [torch.zeros(4), torch.ones(4)]
    x = torch.randn(3, 4, 5, requires_grad=True)
    weight, bias = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    residual = torch.randn(3, 4, 5, requires_grad=True)
    with HostSyncs() as forward:
        y = sync_batch_norm_act(x, *layer_state, weight, bias, torch.tensor(2), activation="silu", residual=residual)
    with HostSyncs() as backward:
        y.backward(torch.randn_like(y))
    assert forward.collectives == ["all_gather_into_tensor"]
    assert backward.collectives == ["all_reduce"]


class SyncBlock(torch.nn.Module):
    """conv, synchronized BN + leaky_relu, conv, synchronized BN + residual + silu."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False, dtype=torch.float64)
        self.conv2 = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False, dtype=torch.float64)
        self.bn1 = tritonbn.SyncBatchNormAct(3, activation="leaky_relu", negative_slope=0.2, dtype=torch.float64)
        self.bn2 = tritonbn.SyncBatchNormAct(3, momentum=None, activation="silu", dtype=torch.float64)

    def forward(self, x):
        out = self._synchronized(self.bn1, self.conv1(x))
        return self._synchronized(self.bn2, self.conv2(out), x)

    @staticmethod
    def _synchronized(bn, input, residual=None):
        # What SyncBatchNormAct.forward runs in a group of several ranks, here in a group of one.
        if bn.momentum is None:
            bn.num_batches_tracked.add_(1)
        momentum = bn.num_batches_tracked if bn.momentum is None else bn.momentum
        return sync_batch_norm_act(input, bn.running_mean, bn.running_var, bn.weight, bn.bias, momentum, bn.eps,
                                   activation=bn.activation, negative_slope=bn.negative_slope, residual=residual)


def test_compiles_whole_with_one_collective_each_way(group_of_one):
    """torch.compile(fullgraph=True): no graph break; the forward graph holds one all_gather per layer, the
    backward one all_reduce per layer; steps equal eager's, running statistics included."""
    torch._dynamo.reset()
    model = SyncBlock()
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    forward_graphs, backward_graphs = GraphRecorder(), GraphRecorder()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=make_boxed_compiler(forward_graphs),
                                                         bw_compiler=make_boxed_compiler(backward_graphs)),
                             fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        dy = torch.randn_like(x)
        got = [compiled(x.requires_grad_()), None]
        (got[1],) = torch.autograd.grad(got[0], x, dy)
        want = [eager(x), None]
        (want[1],) = torch.autograd.grad(want[0], x, dy)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(model.state_dict(), eager.state_dict())
    forward_targets, backward_targets = forward_graphs.targets(), backward_graphs.targets()
    assert sum("all_gather_into_tensor" in t for t in forward_targets) == 2
    assert sum("all_reduce" in t for t in backward_targets) == 2
    assert not any("all_reduce" in t for t in forward_targets)
    assert not any("all_gather" in t for t in backward_targets)
    if tritonbn.uses_kernels(x):  # the kernels' pieces as custom ops (the triton ops on a GPU)
        assert any("tritonbn.sync_normalize" in t for t in forward_targets)
        assert any("tritonbn.sync_input_grad" in t for t in backward_targets)


def test_without_process_group_it_is_batch_norm_act():
    assert not dist.is_initialized()
    sync = tritonbn.SyncBatchNormAct(4, dtype=torch.float64, activation="elu")
    plain = tritonbn.BatchNormAct2d(4, dtype=torch.float64, activation="elu")
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.state_dict(), plain.state_dict())


def test_convert_sync_batchnorm_keeps_state():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), tritonbn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.3),
        torch.nn.BatchNorm2d(4),
    )
    bn = model[1]
    converted = tritonbn.convert_sync_batchnorm(model)
    sync = converted[1]
    assert type(sync) is tritonbn.SyncBatchNormAct
    assert (sync.activation, sync.negative_slope) == ("leaky_relu", 0.3)
    assert sync.weight is bn.weight and sync.running_var is bn.running_var
    assert type(converted[2]) is torch.nn.BatchNorm2d  # plain batch norms are left to nn.SyncBatchNorm
    single = tritonbn.convert_sync_batchnorm(tritonbn.BatchNormAct3d(2, momentum=None))
    assert type(single) is tritonbn.SyncBatchNormAct and single.momentum is None


def test_without_bias():
    sync = tritonbn.SyncBatchNormAct(4, bias=False, dtype=torch.float64, activation="silu")
    plain = tritonbn.BatchNormAct1d(4, bias=False, dtype=torch.float64, activation="silu")
    assert sync.bias is None and list(sync.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        sync.weight.uniform_(0.5, 2.0)
        plain.weight.copy_(sync.weight)
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(sync(x), plain(x))
    converted = tritonbn.convert_sync_batchnorm(plain)
    assert type(converted) is tritonbn.SyncBatchNormAct and converted.bias is None
