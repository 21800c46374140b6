"""Shape presets: the BN layers of the networks they name, and the synthetic sets."""

import math

import pytest

from tritonbn.perf.bandwidth import min_bytes, min_passes
from tritonbn.perf.shapes import PRESETS, preset_shapes


def total_layers(cases):
    return sum(case.layers for case in cases)


@pytest.mark.parametrize(("name", "layers", "ndim"), [("resnet50", 53, 4), ("mobilenetv2", 52, 4),
                                                       ("resnet3d", 20, 5), ("mlp", 4, 2)])
def test_network_presets_count_every_bn_layer_once(name, layers, ndim):
    cases = preset_shapes(name)
    assert total_layers(cases) == layers
    assert len({case.shape for case in cases}) == len(cases), "shapes must be deduplicated"
    assert all(len(case.shape) == ndim for case in cases)


def test_resnet50_batch_and_known_layers():
    assert {case.shape[0] for case in preset_shapes("resnet50")} == {64}
    cases = {case.shape: case.layers for case in preset_shapes("resnet50", batch=256)}
    assert cases[(256, 64, 112, 112)] == 1  # stem
    assert cases[(256, 256, 14, 14)] == 11  # layer3's 3x3 convs and the first 1x1 after layer2
    assert cases[(256, 2048, 7, 7)] == 4  # layer4's expansions and its downsample


def test_scaling_grows_reduced_size_at_fixed_channels():
    cases = preset_shapes("scaling")
    assert len({case.channels for case in cases}) == 1
    sizes = [case.reduced for case in cases]
    assert sizes[0] == 2**10 and sizes[-1] == 2**26 and sizes == sorted(sizes)


def test_tiny_is_small_and_covers_2d_4d_5d():
    cases = preset_shapes("tiny")
    assert {len(case.shape) for case in cases} == {2, 4, 5}
    assert max(math.prod(case.shape) for case in cases) <= 256


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset_shapes("nope")
    assert "tiny" in PRESETS


@pytest.mark.parametrize(("mode", "residual", "activation", "passes"), [
    ("fwd", False, "relu", 2), ("fwd", True, "relu", 3), ("eval", True, "relu", 3), ("bwd", False, "relu", 3),
    ("bwd", True, "relu", 5), ("bwd", True, "identity", 4), ("fwd_bwd", False, "relu", 5),
    ("fwd_bwd", True, "relu", 8),
])
def test_minimum_bytes_model(mode, residual, activation, passes):
    assert min_passes(mode, residual, activation) == passes
    assert min_bytes(mode, 1000, 2, residual, activation) == passes * 2000
