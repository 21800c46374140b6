"""tritonbn.fuse / unfuse on timm's batch norm + activation modules, without timm.

The modules are the stand-ins of timm_standin.py (timm's module paths, names and structure); where timm
imports, test_timm_real.py runs the same conversions on timm's own models.  Float64, fresh random
inputs and statistics, forward, every gradient and the running statistics, in train and eval; on a CPU
the fused layers run interpreted.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from fuse_helpers import (
    MODES,
    DataDependent,
    assert_same_computation,
    assert_same_state,
    fused_layers,
    randomize_batch_norms,
)
from timm_standin import GELU, BatchNormAct2d, SyncBatchNormAct, sync_from
from torch import nn

import tritonbn
from tritonbn.conversion.timm_layers import is_timm_norm_act

SLOPE = 0.01  # the slope fuse reports for activations without one


class Block(nn.Module):
    """timm's modules the ways timm's models use them."""

    def __init__(self, act_layer=nn.SiLU, act_kwargs=None, **options):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(4, act_layer=act_layer, act_kwargs=act_kwargs, **options)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(4, apply_act=False, **options)
        self.act2 = nn.ReLU()
        self.bn3 = BatchNormAct2d(4, apply_act=False, **options)
        self.bn4 = BatchNormAct2d(4, apply_act=False, **options)
        self.act4 = nn.Hardswish()

    def forward(self, x):
        x = self.bn1(self.conv1(x))  # its own activation: the fused module takes its place
        y = self.act2(self.bn2(self.conv2(x)) + x)  # no activation, then a residual add and one (RegNet)
        z = self.bn3(y)  # no activation, output used twice: fused alone
        return self.act4(self.bn4(z * z.sigmoid()))  # no activation, then an activation module


def make_block(**kwargs):
    return randomize_batch_norms(Block(**kwargs)).double()


def fused_block_layers(activation, slope=SLOPE):
    return {"bn1": (activation, slope, False), "bn2": ("relu", SLOPE, True), "bn3": ("identity", SLOPE, False),
            "bn4": ("hardswish", SLOPE, False)}


ACTIVATIONS = [
    pytest.param(nn.SiLU, None, ("silu", SLOPE), id="silu"),
    pytest.param(nn.ReLU, None, ("relu", SLOPE), id="relu"),
    pytest.param(nn.LeakyReLU, {"negative_slope": 0.2}, ("leaky_relu", 0.2), id="leaky_relu"),
    pytest.param(nn.ReLU6, None, ("relu6", SLOPE), id="relu6"),
    pytest.param(nn.ELU, None, ("elu", SLOPE), id="elu"),
    pytest.param(nn.GELU, None, ("gelu", SLOPE), id="gelu"),
    pytest.param(GELU, None, ("gelu", SLOPE), id="timm_gelu"),
    pytest.param(nn.Hardswish, None, ("hardswish", SLOPE), id="hardswish"),
]


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize(("act_layer", "act_kwargs", "expected"), ACTIVATIONS)
def test_block_is_fused_and_computes_the_same(act_layer, act_kwargs, expected, training):
    model = make_block(act_layer=act_layer, act_kwargs=act_kwargs)
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == fused_block_layers(*expected)
    assert fused.tritonbn_fuse_report.unfused == {}
    for name in ("bn1", "bn2", "bn3", "bn4"):
        assert type(fused.get_submodule(name)) is tritonbn.BatchNormAct2d
    assert_same_computation(model, fused, (2, 3, 5, 4), training)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("options", [
    pytest.param({"momentum": None}, id="cumulative-average"),
    pytest.param({"track_running_stats": False}, id="no-running-stats"),
    pytest.param({"affine": False}, id="no-affine"),
    pytest.param({"eps": 1e-3, "momentum": 0.3}, id="eps-momentum"),
])
def test_batch_norm_options_are_carried_over(options, training):
    model = make_block(**options)
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == fused_block_layers("silu")
    for name in ("bn1", "bn2"):
        original, replaced = model.get_submodule(name), fused.get_submodule(name)
        for option in ("eps", "momentum", "affine", "track_running_stats"):
            assert getattr(replaced, option) == getattr(original, option)
    assert_same_computation(model, fused, (3, 3, 4, 4), training)


def test_fused_modules_share_the_state_and_keep_the_children():
    model = make_block(act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.3})
    fused = tritonbn.fuse(model, inplace=True)
    bn1 = fused.bn1
    assert bn1.weight is model.bn1.weight and bn1.running_var is model.bn1.running_var
    assert bn1.num_batches_tracked is model.bn1.num_batches_tracked
    assert (bn1.activation, bn1.negative_slope) == ("leaky_relu", 0.3)
    # timm's drop and act stay where they were (unused: the kernels apply the activation), so the module
    # tree and the state dict keys are the model's.
    assert bn1.act is model.bn1.act and bn1.drop is model.bn1.drop
    assert [name for name, _ in fused.named_modules()] == [name for name, _ in model.named_modules()]


@pytest.mark.parametrize("training", MODES)
def test_unfuse_restores_timm_modules(training):
    model = make_block(act_layer=nn.ReLU, act_kwargs=None, inplace=False)
    fused = tritonbn.fuse(model)
    plain = tritonbn.unfuse(fused)
    for name in ("bn1", "bn2", "bn3", "bn4"):
        restored, original = plain.get_submodule(name), model.get_submodule(name)
        assert type(restored) is BatchNormAct2d and is_timm_norm_act(restored)
        assert list(restored._modules) == ["drop", "act"]
        assert repr(restored) == repr(original)  # drop, act and its settings: ReLU() without inplace here
    assert not any(type(m).__module__.startswith("tritonbn") for m in plain.modules())
    assert_same_computation(model, plain, (2, 3, 4, 4), training)


def test_state_dicts_load_both_ways():
    model, other = make_block(), make_block()
    fused = tritonbn.fuse(model)
    fused.load_state_dict(other.state_dict(), strict=True)
    assert_same_state(fused, other)
    other.load_state_dict(tritonbn.fuse(make_block()).state_dict(), strict=True)
    model.load_state_dict(tritonbn.unfuse(fused).state_dict(), strict=True)
    assert_same_state(model, fused)


@pytest.mark.parametrize("training", MODES)
def test_untraceable_model_replaces_timm_modules_in_place(training):
    """torch.fx cannot trace it: the fallback puts the fused modules in the timm modules' places."""
    model = DataDependent()
    model.features[1] = BatchNormAct2d(4, act_layer=nn.SiLU)
    model.features.append(BatchNormAct2d(4, act_layer=GELU))
    model = randomize_batch_norms(model).double()
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "sequential"
    assert {"features.1": ("silu", SLOPE, False), "features.6": ("gelu", SLOPE, False)}.items() <= \
        fused_layers(fused).items()
    assert type(fused.features[1]) is type(fused.features[6]) is tritonbn.BatchNormAct2d
    assert_same_computation(model, fused, (2, 3, 4, 4), training)
    plain = tritonbn.unfuse(fused)
    assert type(plain.features[1]) is type(plain.features[6]) is BatchNormAct2d
    assert_same_computation(model, plain, (2, 3, 4, 4), training)


@pytest.mark.parametrize("training", MODES)
def test_module_alone(training):
    bn = randomize_batch_norms(BatchNormAct2d(5, act_layer=nn.SiLU)).double()
    fused = tritonbn.fuse(bn)
    assert type(fused) is tritonbn.BatchNormAct2d and fused.activation == "silu"
    assert fused.tritonbn_fuse_report.method == "module" and fused_layers(fused) == {"": ("silu", SLOPE, False)}
    assert_same_computation(bn, fused, (4, 5, 3, 3), training)
    plain = tritonbn.unfuse(fused)
    assert type(plain) is BatchNormAct2d and type(plain.act) is nn.SiLU and plain.act.inplace
    assert_same_computation(bn, plain, (4, 5, 3, 3), training)


class SyncModel(nn.Module):
    def __init__(self, group):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn1 = sync_from(BatchNormAct2d(4, act_layer=nn.SiLU), group)
        self.bn2 = sync_from(BatchNormAct2d(4, apply_act=False), group)
        self.bn3 = SyncBatchNormAct(4, process_group=group)  # made directly: no drop and no act

    def forward(self, x):
        x = self.bn1(self.conv(x))
        return F.relu(self.bn2(x) + x) * self.bn3(x)


class ProcessGroup:
    """Stands in for a process group, which fuse and unfuse carry over and never call outside training in a
    distributed group; like torch's, it cannot be copied."""

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle 'ProcessGroup' object")


@pytest.mark.parametrize("training", MODES)
def test_sync_batch_norm_act(training):
    """timm's SyncBatchNormAct becomes tritonbn's, with its very process group: both are the plain batch
    norm + activation here, outside a distributed group; tests/api/test_sync.py tests tritonbn's in one."""
    group = ProcessGroup()
    model = randomize_batch_norms(SyncModel(group)).double()
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == {"bn1": ("silu", SLOPE, False), "bn2": ("relu", SLOPE, True),
                                   "bn3": ("identity", SLOPE, False)}
    for name in ("bn1", "bn2", "bn3"):
        replaced = fused.get_submodule(name)
        assert type(replaced) is tritonbn.SyncBatchNormAct and replaced.process_group is group
    assert list(fused.bn1._modules) == ["act", "drop"] and not fused.bn3._modules
    assert_same_computation(model, fused, (2, 3, 4, 4), training)
    plain = tritonbn.unfuse(fused)
    for name in ("bn1", "bn2", "bn3"):
        restored = plain.get_submodule(name)
        assert type(restored) is SyncBatchNormAct and restored.process_group is group
        assert repr(restored) == repr(model.get_submodule(name))
    assert_same_computation(model, plain, (2, 3, 4, 4), training)


class Imposter(nn.BatchNorm2d):
    """timm's name, structure and forward, but another module: not timm's class."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


Imposter.__name__ = Imposter.__qualname__ = "BatchNormAct2d"


class Subclass(BatchNormAct2d):
    """timm's module path and name on a subclass of timm's class, which may compute something else."""

    __module__ = BatchNormAct2d.__module__
    __qualname__ = "BatchNormAct2d"


class OtherBase(nn.BatchNorm1d):
    """timm's module path and name on another base class."""

    __module__ = BatchNormAct2d.__module__
    __qualname__ = "BatchNormAct2d"

    def __init__(self, num_features):
        super().__init__(num_features)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _with_forward_hook(module):
    module.register_forward_hook(lambda *args: None)
    return module


def _act_with_hook():
    bn = BatchNormAct2d(4)
    _with_forward_hook(bn.act)
    return bn


def _extra_child():
    bn = BatchNormAct2d(4)
    bn.scale = nn.Identity()
    return bn


LEFT_ALONE = [
    pytest.param(lambda: BatchNormAct2d(4, drop_layer=nn.Dropout), "its drop layer bn.drop is a Dropout",
                 id="drop-layer"),
    pytest.param(lambda: BatchNormAct2d(4, act_layer=nn.Mish), "its activation bn.act, Mish(", id="mish"),
    pytest.param(lambda: BatchNormAct2d(4, act_layer=nn.GELU, act_kwargs={"approximate": "tanh"}),
                 "GELU(approximate='tanh')", id="gelu-tanh"),
    pytest.param(lambda: BatchNormAct2d(4, act_layer=nn.ELU, act_kwargs={"alpha": 2.0}), "ELU(alpha=2.0",
                 id="elu-alpha-2"),
    pytest.param(lambda: _with_forward_hook(BatchNormAct2d(4)), "forward hook on bn,", id="hook"),
    pytest.param(_act_with_hook, "forward hook on bn.act,", id="hook-on-act"),
    pytest.param(lambda: Imposter(4), "not exactly nn.BatchNorm1d/2d/3d", id="other-module"),
    pytest.param(lambda: Subclass(4), "but its class is not derived from BatchNorm2d alone", id="subclass"),
    pytest.param(_extra_child, "but its children ['drop', 'act', 'scale'] are not timm's ['drop', 'act']",
                 id="extra-child"),
    pytest.param(lambda: OtherBase(4), "but its class is not derived from BatchNorm2d alone", id="other-base"),
]


@pytest.mark.parametrize(("make_bn", "reason"), LEFT_ALONE)
def test_what_is_left_alone_and_why(make_bn, reason):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = make_bn()

        def forward(self, x):
            return self.bn(x.reshape(x.shape[0], 4, -1) if isinstance(self.bn, nn.BatchNorm1d) else x)

    model = randomize_batch_norms(Model()).double()
    fused = tritonbn.fuse(model)
    assert fused.tritonbn_fuse_report.fused == []
    assert reason in fused.tritonbn_fuse_report.unfused["bn"]
    assert type(fused.bn) is type(model.bn)
    model.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fused.eval()(x), model(x))


def test_deprecated_backward_hook_keeps_timm_modules_unfused():
    model = make_block()
    model.register_backward_hook(lambda *args: None)
    fused = tritonbn.fuse(model)
    assert fused.tritonbn_fuse_report.fused == []
    assert set(fused.tritonbn_fuse_report.unfused) == {"bn1", "bn2", "bn3", "bn4"}
    assert "register_backward_hook" in fused.tritonbn_fuse_report.unfused["bn1"]


def test_fused_model_copies_and_keeps_the_timm_class():
    fused = copy.deepcopy(tritonbn.fuse(make_block()))
    assert type(tritonbn.unfuse(fused).bn1) is BatchNormAct2d
