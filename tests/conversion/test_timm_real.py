"""tritonbn.fuse / unfuse on the real timm: its models, its layers, and the stand-ins of the CPU suite
checked against them.

Marked ``timm``: these run wherever timm imports and are deselected wherever it does not (tests/conftest.py),
as on a CPU build of torch without torchvision.  timm is imported by a fixture, never at collection.
Float64, forward, every gradient and the running statistics, in train and eval.  Whole models run the
fused modules' PyTorch reference path (`tritonbn.cpu_reference`): under the interpreter one of them
would take many minutes.  The layers of `test_layer_settings_and_what_stays` run the kernels
(interpreted on a CPU), and tests/kernels tests those against PyTorch on every path.
"""

import inspect

import pytest
import timm_standin
import torch
from fuse_helpers import assert_same_computation, assert_same_state, fused_layers, randomize_batch_norms, saved
from torch import nn

import tritonbn
from tritonbn.conversion.timm_layers import is_timm_norm_act

pytestmark = pytest.mark.timm


@pytest.fixture(scope="module")
def timm():
    import timm

    return timm


# A batch of 2 at 64 x 64: the last stage's training-mode batch norms still see 8 values per channel.
INPUT = (2, 3, 64, 64)
RTOL = 1e-9  # float64 rounding amplified by some 50 layers stays near 1e-13 (relative to each kind's norm)


def timm_layer_names(model):
    return [name for name, module in model.named_modules() if is_timm_norm_act(module)]


# (model, how many of timm's batch norm + activation modules it holds, nn.BatchNorm2d + activation fused)
MODELS = [
    pytest.param("efficientnet_b0", 49, 0, id="efficientnet_b0"),
    pytest.param("mobilenetv3_large_100", 46, 0, id="mobilenetv3_large_100"),
    pytest.param("regnety_002", 44, 0, id="regnety_002"),
    pytest.param("resnet50d", 0, 51, id="resnet50d"),
]


@pytest.mark.parametrize(("name", "timm_layers", "plain_pairs"), MODELS)
def test_model(timm, name, timm_layers, plain_pairs):
    model = randomize_batch_norms(timm.create_model(name, pretrained=False)).double()
    names = timm_layer_names(model)
    assert len(names) == timm_layers
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "fx"
    assert set(names) <= set(fused_layers(fused)) and not set(names) & set(report.unfused)
    assert len(report.fused) == timm_layers + plain_pairs
    assert not timm_layer_names(fused)
    with tritonbn.cpu_reference():
        for training in (True, False):
            assert_same_computation(model, fused, INPUT, training, rtol=RTOL)

    plain = tritonbn.unfuse(fused)
    assert timm_layer_names(plain) == names
    assert not any(type(m).__module__.startswith("tritonbn") for m in plain.modules())
    for layer in names:
        restored, original = plain.get_submodule(layer), model.get_submodule(layer)
        assert type(restored) is type(original) and repr(restored) == repr(original)  # act, inplace included
    with tritonbn.cpu_reference():
        assert_same_computation(model, plain, INPUT, training=True, rtol=RTOL)
    fused.load_state_dict(plain.state_dict(), strict=True)  # state dicts load both ways
    plain.load_state_dict(tritonbn.fuse(model).state_dict(), strict=True)
    assert_same_state(plain, fused)


@pytest.mark.parametrize("training", [True, False])
def test_sync_batch_norm_act(timm, training):
    """timm's convert_sync_batchnorm, then fuse: tritonbn's SyncBatchNormAct in place of timm's."""
    model = randomize_batch_norms(timm.create_model("mobilenetv3_small_050", pretrained=False)).double()
    model = timm.layers.convert_sync_batchnorm(model)
    names = [name for name, m in model.named_modules() if type(m) is timm.layers.SyncBatchNormAct]
    assert names
    fused = tritonbn.fuse(model)
    assert set(names) <= set(fused_layers(fused))
    assert all(type(fused.get_submodule(name)) is tritonbn.SyncBatchNormAct for name in names)
    with tritonbn.cpu_reference():
        assert_same_computation(model, fused, INPUT, training, rtol=RTOL)
        plain = tritonbn.unfuse(fused)  # in the state both models are in now
        assert all(type(plain.get_submodule(name)) is timm.layers.SyncBatchNormAct for name in names)
        assert_same_computation(model, plain, INPUT, training, rtol=RTOL)


@pytest.mark.parametrize("training", [True, False])
def test_layer_settings(timm, training):
    """timm's activation names and settings; the fused layers run the kernels (interpreted on a CPU)."""
    BatchNormAct2d = timm.layers.BatchNormAct2d
    model = nn.Sequential(
        BatchNormAct2d(4, act_layer="gelu"),  # timm's own GELU class
        BatchNormAct2d(4, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.2}),
        BatchNormAct2d(4, act_layer="swish", momentum=None),
        BatchNormAct2d(4, act_layer="hard_swish", inplace=False),
        BatchNormAct2d(4, apply_act=False),
    )
    model = randomize_batch_norms(model).double()
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == {"0": ("gelu", 0.01, False), "1": ("leaky_relu", 0.2, False),
                                   "2": ("silu", 0.01, False), "3": ("hardswish", 0.01, False),
                                   "4": ("identity", 0.01, False)}
    assert_same_computation(model, fused, (3, 4, 5, 5), training)


def test_what_stays_and_why(timm):
    BatchNormAct2d = timm.layers.BatchNormAct2d
    model = nn.Sequential(
        BatchNormAct2d(4, act_layer="gelu_tanh"),
        BatchNormAct2d(4, act_layer="mish"),
        BatchNormAct2d(4, act_layer="relu", drop_layer=lambda: timm.layers.DropBlock2d(0.1)),
        timm.layers.FrozenBatchNormAct2d(4),  # not a batch norm module fuse knows: not in the report
    )
    fused = tritonbn.fuse(model)
    assert fused.tritonbn_fuse_report.fused == []
    assert fused.tritonbn_fuse_report.unfused == {
        "0": "its activation 0.act, GELUTanh(), is not one tritonbn fuses",
        "1": "its activation 1.act, Mish(inplace=True), is not one tritonbn fuses",
        "2": "its drop layer 2.drop is a DropBlock2d, not an identity",
    }


def test_pickled_fused_model_unfuses_to_timm(timm):
    model = randomize_batch_norms(timm.create_model("efficientnet_b0", pretrained=False)).double()
    loaded = torch.load(saved(tritonbn.fuse(model)), weights_only=False)
    plain = tritonbn.unfuse(loaded)
    assert timm_layer_names(plain) == timm_layer_names(model)
    assert_same_state(plain, model)


def _parameters(function):
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_stand_ins_are_faithful(timm):
    """The CPU suite's stand-ins have timm's module paths, names, bases, constructor, children and forward."""
    pairs = [(timm_standin.BatchNormAct2d, timm.layers.BatchNormAct2d),
             (timm_standin.SyncBatchNormAct, timm.layers.SyncBatchNormAct),
             (timm_standin.GELU, timm.layers.activations.GELU)]
    for standin, real in pairs:
        assert (standin.__module__, standin.__qualname__, standin.__bases__) == \
            (real.__module__, real.__qualname__, real.__bases__)
        assert _parameters(standin.__init__) == _parameters(real.__init__)
    for options in ({}, {"apply_act": False}, {"act_layer": nn.SiLU, "inplace": False},
                    {"act_layer": nn.LeakyReLU, "act_kwargs": {"negative_slope": 0.3}}, {"drop_layer": nn.Dropout}):
        real = timm.layers.BatchNormAct2d(3, **options)
        assert repr(timm_standin.BatchNormAct2d(3, **options)) == repr(real)
        assert repr(timm_standin.sync_from(timm_standin.BatchNormAct2d(3, **options))) == \
            repr(timm.layers.convert_sync_batchnorm(real))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_stand_in_computes_what_timm_computes(timm, momentum):
    real = randomize_batch_norms(timm.layers.BatchNormAct2d(3, momentum=momentum, act_layer=nn.SiLU)).double()
    standin = timm_standin.BatchNormAct2d(3, momentum=momentum, act_layer=nn.SiLU).double()
    standin.load_state_dict(real.state_dict())
    for training in (True, False):
        assert_same_computation(real, standin, (4, 3, 2, 2), training)
