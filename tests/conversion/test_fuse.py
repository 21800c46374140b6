"""tritonbn.fuse / tritonbn.unfuse on small ResNet- and MobileNet-style networks, in float64.

The converted model must compute what the original computes -- outputs, input and parameter gradients,
running statistics -- in training and in eval; batch norms that cannot be fused stay untouched.
Models are tiny (4-8 channels, 8x8 images) because on CPU the fused layers run under the interpreter.
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from fuse_helpers import MODES, DataDependent, assert_same_computation, fused_layers, make
from torch import nn

import tritonbn
from tritonbn.conversion.fused_sequential import FusedSequential
from tritonbn.conversion.unfusion import BatchNormThenAct2d
from tritonbn.modules import _BatchNormAct


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs, inplace ReLU shared by both, optional downsample."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 - 3x3 - 1x1 with expansion 4."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def downsample(inplanes, outplanes, stride):
    return nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))


class TinyResNet(nn.Module):
    """Stem, a BasicBlock with a strided downsample, a Bottleneck with a channel downsample, a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv3x3(3, 4)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 6, 2, downsample(4, 6, 2)))
        self.layer2 = nn.Sequential(Bottleneck(6, 2, 1, downsample(6, 8, 1)))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand (ReLU6), depthwise (ReLU6), linear projection plus the skip."""

    def __init__(self, channels=4, expand_ratio=2):
        super().__init__()
        hidden = channels * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.conv(x)


class FunctionalActivations(nn.Module):
    """Batch norms followed by functional activations, some fusable and some not."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(7))
        self.elu = nn.ELU(alpha=0.5)

    def forward(self, x):
        x = F.leaky_relu(self.bns[0](x), 0.2)
        x = torch.relu(self.bns[1](x))
        x = F.silu(self.bns[2](x)).tanh()
        x = F.gelu(self.bns[3](x), approximate="tanh")  # not fusable: the kernels compute exact gelu
        x = self.elu(self.bns[4](x))  # not fusable: alpha != 1
        x = F.hardswish(torch.add(x, self.bns[5](x)))
        return self.bns[6](x).relu()


class UsedTwice(nn.Module):
    """A batch norm whose output feeds both the activation and the sum: it must not be fused."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.bn_out = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x)
        return self.bn_out(F.relu(y) + y)


def is_fused_module(module):
    return isinstance(module, _BatchNormAct)


@pytest.mark.parametrize("training", MODES)
def test_resnet(training):
    model = make(TinyResNet)
    fused = tritonbn.fuse(model)
    relu = ("relu", 0.01, False)
    relu_after_add = ("relu", 0.01, True)
    assert fused_layers(fused) == {
        "bn1": relu,
        "layer1.0.bn1": relu, "layer1.0.bn2": relu_after_add,
        "layer1.1.bn1": relu, "layer1.1.bn2": relu_after_add,
        "layer2.0.bn1": relu, "layer2.0.bn2": relu, "layer2.0.bn3": relu_after_add,
    }
    # A downsample branch's batch norm is the residual operand, already taken by the block's last one.
    assert sorted(fused.tritonbn_fuse_report.unfused) == ["layer1.1.downsample.1", "layer2.0.downsample.1"]
    assert all(type(fused.get_submodule(name)) is tritonbn.BatchNormAct2d for name in fused_layers(fused))
    # The ReLU modules stay (fuse keeps every submodule) but the graph no longer calls them.
    called = [fused.get_submodule(node.target) for node in fused.graph.nodes if node.op == "call_module"]
    assert not any(isinstance(m, nn.ReLU) for m in called)
    assert_same_computation(model, fused, (2, 3, 8, 8), training)


@pytest.mark.parametrize("training", MODES)
def test_mobilenet_v2_block(training):
    model = make(InvertedResidual)
    fused = tritonbn.fuse(model)
    # The projection has no activation: its batch norm absorbs the skip connection alone.
    assert fused_layers(fused) == {
        "conv.1": ("relu6", 0.01, False), "conv.4": ("relu6", 0.01, False), "conv.7": ("identity", 0.01, True),
    }
    assert_same_computation(model, fused, (3, 4, 8, 8), training)


@pytest.mark.parametrize("training", MODES)
def test_functional_activations(training):
    model = make(FunctionalActivations)
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == {
        "bns.0": ("leaky_relu", 0.2, False), "bns.1": ("relu", 0.01, False), "bns.2": ("silu", 0.01, False),
        "bns.5": ("hardswish", 0.01, True), "bns.6": ("relu", 0.01, False),
    }
    assert sorted(fused.tritonbn_fuse_report.unfused) == ["bns.3", "bns.4"]
    assert_same_computation(model, fused, (2, 4, 8, 8), training)


def test_batch_norm_used_twice_is_left_alone():
    model = make(UsedTwice)
    fused = tritonbn.fuse(model, inplace=True)
    report = fused.tritonbn_fuse_report
    assert report.fused == []
    assert "used by 2 nodes" in report.unfused["bn"]
    assert fused.bn is model.bn and fused.bn_out is model.bn_out
    assert_same_computation(copy.deepcopy(model), fused, (2, 4, 8, 8), True)


def called_modules(model, x):
    """The types of the modules a call of ``model`` runs, in order (a global hook sees every module call)."""
    called = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: called.append(type(module)))
    try:
        model(x)
    finally:
        handle.remove()
    return called


@pytest.mark.parametrize("training", MODES)
def test_untraceable_model_falls_back_to_fused_sequentials(training):
    model = make(DataDependent)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "sequential" and "TraceError" in report.trace_error
    assert type(fused) is DataDependent and type(fused.features) is FusedSequential
    assert fused_layers(fused) == {"features.1": ("silu", 0.01, False), "features.4": ("leaky_relu", 0.3, False)}
    assert list(report.unfused) == ["bn"]
    # The container still holds the plain modules; called whole, it runs each pair as one fused module.
    assert [type(m) for m in fused.features] == [type(m) for m in model.features]
    assert called_modules(copy.deepcopy(fused.features), torch.randn(2, 3, 4, 4, dtype=torch.float64)) == [
        nn.Conv2d, tritonbn.BatchNormAct2d, nn.Conv2d, tritonbn.BatchNormAct2d, FusedSequential]
    assert_same_computation(model, fused, (2, 3, 8, 8), training)


def test_input_model_is_not_modified():
    model = make(TinyResNet)
    modules_before = dict(model.named_modules())
    state_before = copy.deepcopy(model.state_dict())
    fused = tritonbn.fuse(model)
    assert dict(model.named_modules()) == modules_before
    assert not any(is_fused_module(m) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    fused_params = {id(p) for p in fused.parameters()}
    assert not fused_params & {id(p) for p in model.parameters()}


def test_inplace_shares_parameters_and_unfused_layers():
    model = make(TinyResNet)
    fused = tritonbn.fuse(model, inplace=True)
    assert fused.get_submodule("layer1.0.bn1").weight is model.layer1[0].bn1.weight
    assert fused.get_submodule("layer1.0.bn1").running_mean is model.layer1[0].bn1.running_mean
    assert fused.get_submodule("layer1.1.downsample.1") is model.layer1[1].downsample[1]
    assert {id(p) for p in fused.parameters()} == {id(p) for p in model.parameters()}


class Options1d(nn.Sequential):
    def __init__(self):
        super().__init__(nn.BatchNorm1d(5, eps=1e-3, momentum=None), nn.LeakyReLU(0.1))


class Options3d(nn.Sequential):
    def __init__(self):
        super().__init__(nn.BatchNorm3d(3, affine=False, track_running_stats=False), nn.ReLU(),
                         nn.BatchNorm3d(3, momentum=0.3), nn.GELU())


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize(("model_class", "input_shape"), [(Options1d, (6, 5)), (Options3d, (2, 3, 2, 3, 4))])
def test_batch_norm_options_are_carried_over(model_class, input_shape, training):
    model = make(model_class)
    model[-2].requires_grad_(False)  # a frozen batch norm stays frozen
    fused = tritonbn.fuse(model)
    for index, original in enumerate(model):
        if not isinstance(original, nn.modules.batchnorm._BatchNorm):
            continue
        converted = fused.get_submodule(str(index))
        assert is_fused_module(converted)
        for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(converted, attribute) == getattr(original, attribute), attribute
        for name, param in original.named_parameters():
            assert getattr(converted, name).requires_grad == param.requires_grad
            assert getattr(converted, name).dtype == torch.float64
    assert_same_computation(model, fused, input_shape, training)


class Messages(logging.Handler):
    """Collects the messages logged (caplog would need pytest's logging plugin, which runs may turn off)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", ["tritonbn.conversion.fusion", "tritonbn"])
def test_report_is_logged(name):
    """Once per logger, on the module's logger and its parents'."""
    logger, handler = logging.getLogger(name), Messages()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        fused = tritonbn.fuse(make(UsedTwice))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert isinstance(fused.tritonbn_fuse_report, tritonbn.FuseReport)
    assert handler.messages == [fused.tritonbn_fuse_report.summary()]
    assert "unfused bn: output used by 2 nodes" in handler.messages[0]


@pytest.mark.parametrize("training", MODES)
def test_unfuse_round_trip(training):
    model = make(TinyResNet)
    plain = tritonbn.unfuse(tritonbn.fuse(model))
    assert all(type(m).__module__.startswith("torch.") for m in plain.modules()), plain
    assert_same_computation(model, plain, (2, 3, 8, 8), training)
    fresh = TinyResNet().double()
    fresh.load_state_dict(plain.state_dict())
    plain.load_state_dict(model.state_dict())


class HandFused(nn.Module):
    """A model written with a fused module directly, in no nn.Sequential slot `unfuse` could reuse."""

    def __init__(self):
        super().__init__()
        self.conv = conv3x3(3, 4)
        self.bn = tritonbn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2)

    def forward(self, x):
        return self.bn(self.conv(x), x.mean(1, keepdim=True).expand(-1, 4, -1, -1))


def test_unfuse_outside_a_graph():
    model = make(HandFused)
    plain = tritonbn.unfuse(model)
    assert type(plain.bn) is BatchNormThenAct2d and isinstance(plain.bn, nn.BatchNorm2d)
    assert not any(is_fused_module(m) for m in plain.modules())
    assert_same_computation(model, plain, (2, 3, 8, 8), True)
    HandFused().double().load_state_dict(plain.state_dict())
    assert is_fused_module(model.bn), "unfuse must not modify its input"
