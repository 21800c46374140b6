"""Launch planning: tile shapes, the split of the N*S rows across programs, and tensor layouts.

Everything here depends only on shapes, strides, dtypes and the device, so the forward and backward plans
compute it once per specialization and every later call with the same tensors only allocates and launches.
"""

import functools
import math
import struct

import torch
import triton.language as tl

# The interpreter runs one program after another in Python: small tiles keep tests quick and make small
# test shapes cross tile and split boundaries; GPUs want big tiles and several programs per SM.
_TILE_ELEMENTS = {"cuda": 4096, "cpu": 512}
_PROGRAMS_PER_SM = 4
_CPU_PROGRAMS = 32
_MAX_CHANNEL_BLOCK = {"cuda": 64, "cpu": 16}
# Channel blocks shrink towards this while the splits the merge allows leave the device short of programs
# (16 float32 channels are 64 contiguous bytes of a channels_last row: whole 32-byte sectors).
_MIN_CHANNEL_BLOCK = {"cuda": 16, "cpu": 4}
# Every program of a direction's second kernel reads all the partials of its channels: splits^2 * C pairs
# in all. Capping the splits keeps those (L2-resident) reads under this fraction of the tensor's bytes.
_MERGE_READ_BUDGET = 0.05
_MERGE_TILE = {"cuda": 2048, "cpu": 32}  # partials merged per step, [SPLIT_BLOCK, BLOCK_C]


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(device: torch.device):
    """The CUDA device index a kernel on ``device`` runs on, or None off CUDA."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Tiling:
    """Tile shape and the split of the R = N*S rows across programs, shared by a call's kernels."""

    def __init__(self, R: int, C: int, channels_contiguous: bool, device: torch.device, element_size: int = 4,
                 stats_size: int = 4):
        kind = "cuda" if device.type == "cuda" else "cpu"
        R = max(R, 1)  # an empty batch launches nothing, but the shapes below stay valid
        tile = _TILE_ELEMENTS[kind]
        index = device_index(device)
        programs = _CPU_PROGRAMS if index is None else _PROGRAMS_PER_SM * _multiprocessor_count(index)
        merge_cap = math.isqrt(int(_MERGE_READ_BUDGET * R * element_size / (2 * stats_size)))
        self.block_c = 1
        if channels_contiguous and C > 1:
            # channels_last / (N, C): a tile spans neighbouring channels, which are adjacent in memory. Narrower
            # tiles make more channel blocks where the merge caps the splits (few rows, or many per channel).
            self.block_c = min(_next_power_of_2(C), _MAX_CHANNEL_BLOCK[kind])
            while self.block_c > _MIN_CHANNEL_BLOCK[kind] and _cdiv(C, self.block_c) * merge_cap < programs:
                self.block_c //= 2
        self.block_r = max(1, min(tile // self.block_c, _next_power_of_2(R)))
        self.channel_blocks = _cdiv(max(C, 1), self.block_c)
        splits = max(1, min(_cdiv(R, self.block_r), programs // self.channel_blocks, merge_cap))
        self.rows_per_split = _cdiv(_cdiv(R, splits), self.block_r) * self.block_r
        self.num_splits = _cdiv(R, self.rows_per_split)
        self.last_split_rows = R - (self.num_splits - 1) * self.rows_per_split
        # The last split's end row and tile must stay inside int32, or the kernels index in int64.
        self.rows_i64 = self.num_splits * self.rows_per_split + self.block_r >= 2**31
        self.split_block = min(_next_power_of_2(self.num_splits), max(1, _MERGE_TILE[kind] // self.block_c))
        self.grid = (self.channel_blocks, self.num_splits)
        self.num_warps = 4 if self.block_r * self.block_c <= 2048 else 8


def ncs_strides(shape, stride):
    """Strides (n, c, s) that address a tensor as (N, C, S), or None if its spatial dims don't collapse."""
    spatial = [(size, step) for size, step in zip(shape[2:], stride[2:]) if size != 1]
    for (_, outer_stride), (inner_size, inner_stride) in zip(spatial, spatial[1:]):
        if outer_stride != inner_stride * inner_size:
            return None
    return stride[0], stride[1], spatial[-1][1] if spatial else 1


def output_layout(shape, stride) -> tuple[tuple[int, ...], bool]:
    """(strides of the output for an input of ``shape``/``stride``, whether the input must be copied first).

    The output is ``empty_like`` the input as the kernels see it: the input itself when its spatial dims
    collapse to one stride, else its contiguous copy. The fake implementations use this too, so compiled
    and eager outputs have the same strides.
    """
    if ncs_strides(shape, stride) is None:
        return torch.empty(shape, device="meta").stride(), True
    # The strides torch.empty_like gives: the input's own when it is dense, else a dense layout in its order.
    return torch.empty_like(torch.empty_strided(shape, stride, device="meta")).stride(), False


def dense(t):
    """``t`` (or None) as a dense tensor: the kernels index per-channel vectors with stride 1."""
    return None if t is None else t.contiguous()


def compute_dtype(dtype: torch.dtype):
    """The Triton dtype of the arithmetic: float64 for float64 input, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=256)
def split_float(value: float) -> tuple[float, float]:
    """A float as a float32 head plus the rest: Triton passes Python floats as float32, so float64
    kernels rebuild the value from both (to about 48 bits)."""
    head = struct.unpack("f", struct.pack("f", value))[0]
    return head, value - head


def spatial_size(shape) -> int:
    return math.prod(shape[2:])
