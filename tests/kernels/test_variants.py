"""Every kernel variant the tuning table can pick, correct under the interpreter (and on CUDA): each candidate
`tritonbn-perf tune` compares with the interpreter's small tiles, and one per variant with a GPU's tiles, run
through the public API on shapes that cross tile, split and channel-block boundaries, against float64 PyTorch.

The persistent variant's grid barrier cannot run where programs run one after another: under the interpreter
it runs as its two halves (partials, then a launch that merges them and applies) with the persistent tiling,
one tile a program; `tritonbn-perf compile-check` compiles the barrier itself for sm_90.
"""

import pytest
import torch
from _helpers import arrange, check_batch_norm_act, make_case

from tritonbn import plans
from tritonbn.kernels import configs
from tritonbn.kernels.plan import LAYOUT_NAMES, layout_family, ncs_strides, spatial_size

ROWS_CASE = ((3, 20, 5, 7), "channels_last")  # channel-contiguous rows: 2 channel blocks, several splits
PLANES_CASE = ((2, 3, 17, 19), "contiguous")  # NCHW: spatial runs of several tiles, samples split across tiles
CASES = [ROWS_CASE, PLANES_CASE, ((37, 12), "contiguous")]


def _layout(x):
    """The layout family the kernels address ``x`` in."""
    N, S = x.shape[0], spatial_size(x.shape)
    return LAYOUT_NAMES[layout_family(N, S, [ncs_strides(x.shape, x.stride())])]


def _candidates(shape, arrangement, multiprocessors):
    x = arrange(torch.empty(shape), arrangement)
    N, C, S = shape[0], shape[1], spatial_size(shape)
    found = []
    for direction in configs.DIRECTIONS:
        found += [c for c in configs.candidates(direction, torch.float32, _layout(x), N, C, S, multiprocessors)
                  if c not in found]
    return found


def _params():
    for shape, arrangement in CASES:
        name = f"{'x'.join(map(str, shape))}-{arrangement}"
        for index, config in enumerate(_candidates(shape, arrangement, None)):
            yield pytest.param(shape, arrangement, config, id=f"{name}-{index}-{config.variant}")
    for shape, arrangement in (ROWS_CASE, PLANES_CASE):  # a GPU's tiles: one configuration per variant
        name = f"{'x'.join(map(str, shape))}-{arrangement}"
        seen = set()
        for config in _candidates(shape, arrangement, 132):
            kind = (config.variant, config.addressing)
            if kind not in seen:
                seen.add(kind)
                yield pytest.param(shape, arrangement, config, id=f"{name}-gpu-{config.variant}-{config.addressing}")


@pytest.fixture
def planned_with(monkeypatch):
    """A context manager planning every call inside it with the given configuration (plans made anew)."""
    monkeypatch.setattr(plans, "PLANS", {})
    return configs.override


@pytest.mark.parametrize(("shape", "arrangement", "config"), list(_params()))
def test_every_candidate_configuration(device, planned_with, shape, arrangement, config):
    case = make_case(shape, torch.float32, device, residual=True)
    case.x = arrange(case.x, arrangement)
    case.residual = arrange(case.residual, arrangement)
    with planned_with(config):
        check_batch_norm_act(case, training=True, activation="relu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("variant", ["ticket", "merge"])
@pytest.mark.parametrize(("shape", "arrangement"), [ROWS_CASE, PLANES_CASE])
def test_variants_in_every_dtype(device, planned_with, shape, arrangement, variant, dtype):
    config = next(c for c in _candidates(shape, arrangement, None) if c.variant == variant)
    case = make_case(shape, dtype, device, param_dtype=torch.float32 if dtype != torch.float64 else dtype)
    case.x = arrange(case.x, arrangement)
    with planned_with(config):
        check_batch_norm_act(case, training=True, activation="silu")


def test_candidates_cover_every_variant_and_the_previous_release():
    found = configs.candidates("fwd", torch.bfloat16, "rows", 64, 512, 49, 132)
    assert {c.variant for c in found} == set(configs.VARIANTS)
    assert any(c.addressing == "strided" for c in found)
    assert {c.variant for c in configs.candidates("eval", torch.bfloat16, "rows", 64, 512, 49, 132)} == {"ticket"}
    # Too big to hold on chip: no persistent candidate.
    assert all(c.variant != "persistent" for c in configs.candidates("fwd", torch.bfloat16, "rows", 64, 256, 3136, 132))


def test_the_heuristic_reads_whole_128_byte_row_segments_on_a_gpu():
    for dtype, channels in ((torch.bfloat16, 128), (torch.float32, 64), (torch.float64, 32)):
        config = configs.heuristic("fwd", dtype, "rows", 64, 2048, 49, on_gpu=True)
        assert config.block_c == channels and config.variant == "ticket"
    assert configs.heuristic("fwd", torch.bfloat16, "rows", 64, 24, 49, on_gpu=True).block_c == 32  # C allows no more


def test_the_table_is_looked_up_by_gpu_direction_dtype_layout_and_ranges(monkeypatch):
    picked = configs.KernelConfig("merge", 128, 32, 1, 8)
    entry = {"gpu": "NVIDIA H200", "direction": "bwd", "dtype": "bf16", "layout": "rows", "c_min": 100, "c_max": 300,
             "r_min": 1000, "r_max": 5000, "config": picked.as_dict()}
    monkeypatch.setattr(configs, "_table", lambda: (entry,))
    assert configs.table_entry("NVIDIA H200", "bwd", torch.bfloat16, "rows", 256, 3136) == picked
    for other in [("NVIDIA H100", "bwd", torch.bfloat16, "rows", 256, 3136),
                  ("NVIDIA H200", "fwd", torch.bfloat16, "rows", 256, 3136),
                  ("NVIDIA H200", "bwd", torch.float32, "rows", 256, 3136),
                  ("NVIDIA H200", "bwd", torch.bfloat16, "planes", 256, 3136),
                  ("NVIDIA H200", "bwd", torch.bfloat16, "rows", 512, 3136),
                  ("NVIDIA H200", "bwd", torch.bfloat16, "rows", 256, 9000)]:
        assert configs.table_entry(*other) is None
    assert configs.table_entry(None, "bwd", torch.bfloat16, "rows", 256, 3136) is None  # a CPU: no table


def test_invalid_configurations_are_refused():
    with pytest.raises(ValueError, match="variant"):
        configs.KernelConfig("fastest")
    with pytest.raises(ValueError, match="power of two"):
        configs.KernelConfig(block_r=48)
    with pytest.raises(ValueError, match="block_s"):
        configs.KernelConfig(block_r=16, block_s=32)
