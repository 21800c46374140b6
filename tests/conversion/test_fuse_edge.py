"""tritonbn.fuse / unfuse on the less common shapes of a model, in float64.

Residual operands that broadcast, forward parameters with defaults, submodules and attributes that
forward never uses, batch norm subclasses, the FusedSequential fallback (read inside, changed after
fusing, undone by unfuse), train/eval modes, and batch norms without a bias.  Models are tiny: on CPU
the fused layers run interpreted.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from fuse_helpers import (
    DataDependent,
    assert_same_computation,
    double_output,
    fused_layers,
    make,
    randomize_batch_norms,
    saved,
)
from torch import nn

import tritonbn
from tritonbn.conversion.fused_graph import fused_residual_act
from tritonbn.conversion.fused_sequential import FusedSequential


def is_tritonbn(module):
    return type(module).__module__.startswith("tritonbn")


class BroadcastResidual(nn.Module):
    """Residual adds whose other operand is not of the batch norm input's shape."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)
        self.bn3 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = F.relu(self.bn1(x) + self.pool(x))  # (N, C, 1, 1) broadcasts to the input's shape
        z = F.silu(self.bn2(self.pool(y)) + y)  # the sum is larger than the batch norm's input
        return F.relu6(self.bn3(z) + z.mean())  # a 0-dim tensor: type promotion treats it as a scalar


@pytest.mark.parametrize("training", [True, False])
def test_residual_that_broadcasts(training):
    model = make(BroadcastResidual)
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == {
        "bn1": ("relu", 0.01, True), "bn2": ("silu", 0.01, True), "bn3": ("relu6", 0.01, True),
    }
    assert_same_computation(model, fused, (2, 3, 3, 3), training)
    plain = tritonbn.unfuse(fused)
    assert not any(is_tritonbn(m) for m in plain.modules())
    assert not any(node.target is fused_residual_act for node in plain.graph.nodes)
    assert [node.args[0].target for node in fused.graph.nodes if node.target is fused_residual_act] == [
        "bn1", "bn2", "bn3"]
    assert_same_computation(model, plain, (2, 3, 3, 3), training)


class Defaults(nn.Module):
    """forward with optional arguments whose branches torch.fx cannot see."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, scale=1.0, extra=None, *, negate=False):
        y = F.silu(self.bn(x)) * scale
        if isinstance(scale, int):
            y = y * 0
        y = y if extra is None else y + extra
        return -y if negate else y


def test_forward_defaults_are_traced_and_guarded():
    model = make(Defaults)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "fx" and fused_layers(fused) == {"bn": ("silu", 0.01, False)}
    assert report.specialized == {"scale": 1.0, "extra": None, "negate": False}
    assert "extra=None" in report.summary()
    for trip in (lambda m: m, lambda m: copy.deepcopy(m), lambda m: torch.load(saved(m), weights_only=False)):
        copied = trip(fused)
        assert_same_computation(model, copied, (2, 3, 3, 3), False)
        x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(copied(x, 1.0, extra=None, negate=False), model(x))
        for other in ({"extra": x}, {"scale": 2.0}, {"scale": 1}, {"negate": True}):
            with pytest.raises(ValueError, match="traced forward with"):
                copied(x, **other)


class Varargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x, *rest):
        return self.features(x) if not rest else self.features(x) + rest[0]


def test_forward_with_varargs_takes_the_sequential_fallback():
    model = make(Varargs)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "sequential" and "*rest" in report.trace_error
    assert fused_layers(fused) == {"features.0": ("relu", 0.01, False)}
    x, rest = torch.randn(2, 3, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fused.eval()(x, rest), model.eval()(x, rest))


class Unused(nn.Module):
    """forward uses part of the model: a head, a buffer, a parameter and a container's child stay idle."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(3))
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Linear(2, 2), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Linear(3, 2)
        self.register_buffer("class_weights", torch.rand(2))
        self.register_buffer("cache", torch.zeros(1), persistent=False)
        self.num_classes = 2

    def forward(self, x):
        return self.stem[3](self.stem[2](self.stem[0](x)))

    def classify(self, x):
        return self.head(self.forward(x).mean((2, 3)))


def assert_all_modes(model, training):
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes == dict.fromkeys(modes, training), modes


def test_fuse_keeps_the_whole_model():
    model = make(Unused).eval()
    keys = list(model.state_dict())
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == {"stem.2": ("relu", 0.01, False)}
    assert [name for name, _ in fused.named_modules()] == [name for name, _ in model.named_modules()]
    copies = {"fused": fused, "deepcopy": copy.deepcopy(fused), "copy": copy.copy(fused),
              "torch.save": torch.load(saved(fused), weights_only=False)}
    for how, copied in copies.items():
        assert list(copied.state_dict()) == keys, how
        assert "cache" in dict(copied.named_buffers()) and "cache" not in copied.state_dict(), how
        assert copied.num_classes == 2, how
        assert_all_modes(copied, False)
        assert isinstance(copied.tritonbn_fuse_report, tritonbn.FuseReport)
        copied.load_state_dict(model.state_dict())
        make(Unused).load_state_dict(copied.state_dict())
    plain = tritonbn.unfuse(fused)
    assert list(plain.state_dict()) == keys and plain.num_classes == 2
    assert not any(is_tritonbn(m) for m in plain.modules()) and not hasattr(plain, "tritonbn_fuse_report")
    assert_all_modes(plain, False)
    make(Unused).load_state_dict(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    assert_same_computation(model, plain, (2, 3, 2, 2), False)


class SubclassedNorm(nn.BatchNorm2d):
    """A batch norm subclass (as libraries define for frozen or otherwise special batch norms)."""


class WithSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = SubclassedNorm(3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(F.relu(self.norm(x))))


def test_batch_norm_subclass_stays_a_leaf_and_unfused():
    model = make(WithSubclass)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "fx", report.trace_error
    assert fused_layers(fused) == {"bn": ("relu", 0.01, False)}
    assert "SubclassedNorm" in report.unfused["norm"]
    assert type(fused.norm) is SubclassedNorm
    assert_same_computation(model, fused, (2, 3, 3, 3), True)


class PackageBlock(nn.Module):
    """A network defined in the tritonbn package, as the perf harness's are: no fused module, so fuse traces it."""

    __module__ = "tritonbn.perf.models"

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(x) + x)


class HoldsPackageBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = PackageBlock()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.silu(self.bn(self.block(x)))


def test_tritonbn_classes_other_than_fused_modules_are_traced_through():
    model = make(HoldsPackageBlock)
    fused = tritonbn.fuse(model)
    assert fused.tritonbn_fuse_report.method == "fx"
    assert fused_layers(fused) == {"block.bn": ("relu", 0.01, True), "bn": ("silu", 0.01, False)}
    assert_same_computation(model, fused, (2, 3, 3, 3), True)


class HoldsFusedSequential(nn.Module):
    """Traceable, and holds a FusedSequential (an earlier fuse's fallback): its forward makes fused modules on the
    fly, which a graph cannot call, so the trace keeps it whole."""

    def __init__(self):
        super().__init__()
        self.features = FusedSequential(nn.BatchNorm2d(3), nn.ReLU())
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(self.features(x)))


def test_fused_sequential_stays_a_leaf():
    model = make(HoldsFusedSequential)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "fx", report.trace_error
    assert fused_layers(fused) == {"bn": ("relu", 0.01, False)}
    assert report.unfused == {"features.0": "not called in the traced forward"}
    assert type(fused.features) is FusedSequential
    assert_same_computation(model, fused, (2, 3, 3, 3), True)


class ReadsInside(nn.Module):
    """Untraceable, and reads inside its nn.Sequential besides calling it whole: it takes the output of
    every module in turn, and the first batch norm's output by indexing."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3), nn.SiLU())

    def forward(self, x):
        taps, y = [], x
        for module in self.features:
            y = module(y)
            taps.append(y)
        if y.mean() > 10:  # control flow on a tensor value: torch.fx cannot trace it
            y = -y
        taps += [self.features[1](self.features[0](x)), self.features(x), y]
        return torch.cat([tap.flatten(1) for tap in taps], 1)


@pytest.mark.parametrize("training", [True, False])
def test_fallback_keeps_what_code_reads_inside_the_sequential(training):
    model = make(ReadsInside)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "sequential"
    assert fused_layers(fused) == {"features.1": ("relu", 0.01, False), "features.3": ("silu", 0.01, False)}
    assert type(fused.features) is FusedSequential and len(fused.features) == 5
    assert [type(m) for m in fused.features] == [type(m) for m in model.features]
    assert_same_computation(model, fused, (2, 3, 3, 3), training)


def test_fused_sequential_follows_changes_after_fuse():
    model = randomize_batch_norms(DataDependent())  # float32 until fused and called once
    fused = tritonbn.fuse(model)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x), model(x))
    fused.load_state_dict(model.state_dict())  # the same running statistics, float32 rounding aside
    for changed in (model, fused):
        changed.double()  # new buffer tensors, which the fused modules the call above made must use
    assert_same_computation(model, fused, (2, 3, 4, 4), True)
    for changed in (model, fused):
        changed.features[4].momentum = None  # cumulative average from now on
        changed.features[1].register_forward_hook(double_output)  # the pair must run as two plain calls
        changed.features[5] = nn.ReLU6()
    assert_same_computation(model, fused, (2, 3, 4, 4), True)
    fused.load_state_dict(model.state_dict(), strict=True)
    DataDependent().double().load_state_dict(fused.state_dict(), strict=True)
    for copied in (copy.deepcopy(fused), torch.load(saved(fused), weights_only=False)):
        assert type(copied.features) is FusedSequential
        assert_same_computation(model, copied, (2, 3, 4, 4), False)


class Stage(nn.Sequential):
    """An nn.Sequential subclass: fuse cannot know what else its class does, so it stays as it is."""


class UntraceableStage(DataDependent):
    def __init__(self):
        super().__init__()
        self.features = Stage(*self.features)


def test_fallback_leaves_sequential_subclasses():
    model = make(UntraceableStage)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "sequential" and report.fused == [] and type(fused.features) is Stage
    assert "in a Stage; fuse leaves nn.Sequential subclasses as they are" == report.unfused["features.1"]
    assert_same_computation(model, fused, (2, 3, 4, 4), True)


@pytest.mark.parametrize("training", [True, False])
def test_unfuse_undoes_the_sequential_fallback(training):
    model = make(DataDependent).train(training)
    fused = tritonbn.fuse(model)
    assert fused.tritonbn_fuse_report.method == "sequential"
    assert_all_modes(fused, training)
    plain = tritonbn.unfuse(fused)
    assert type(plain.features) is nn.Sequential
    assert [type(m) for m in plain.features] == [type(m) for m in model.features]
    assert plain.features[5].negative_slope == 0.3
    assert_all_modes(plain, training)
    assert any(is_tritonbn(m) for m in fused.modules()), "unfuse must not modify its input"
    assert_same_computation(model, plain, (2, 3, 4, 4), training)


@pytest.mark.parametrize("training", [True, False])
def test_fuse_keeps_train_and_eval_modes(training):
    model = nn.Sequential(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), nn.Sequential(nn.Conv2d(3, 3, 1)))
    fused = tritonbn.fuse(model.train(training))
    assert fused.tritonbn_fuse_report.method == "fx"
    assert_all_modes(fused, training)
    assert_all_modes(copy.deepcopy(fused), training)
    assert_all_modes(fused.train(not training), not training)


def without_bias(bn):
    # nn.BatchNorm*d(..., bias=False) exists from torch 2.13 on; this works with older releases too.
    bn.register_parameter("bias", None)
    return bn


class NoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = without_bias(nn.BatchNorm2d(3))
        self.bn2 = without_bias(nn.BatchNorm2d(3))
        self.tail = nn.Sequential(without_bias(nn.BatchNorm2d(3)), nn.ELU())

    def forward(self, x):
        return self.tail(F.relu(self.bn2(F.gelu(self.bn1(x))) + x))


def test_batch_norm_without_bias():
    model = make(NoBias)
    fused = tritonbn.fuse(model)
    assert sorted(fused_layers(fused)) == ["bn1", "bn2", "tail.0"]
    assert all(fused.get_submodule(name).bias is None for name in fused_layers(fused))
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_computation(model, fused, (2, 3, 3, 3), True)
    synced = tritonbn.convert_sync_batchnorm(copy.deepcopy(fused))
    assert type(synced.bn1) is tritonbn.SyncBatchNormAct and synced.bn1.bias is None
    plain = tritonbn.unfuse(synced)
    assert type(plain.bn1) is nn.SyncBatchNorm and plain.bn1.bias is None
    assert list(plain.state_dict()) == list(model.state_dict())
    plain = tritonbn.unfuse(fused)
    assert type(plain.get_submodule("tail.0")) is nn.BatchNorm2d and plain.get_submodule("tail.0").bias is None
    assert_same_computation(model, plain, (2, 3, 3, 3), True)
