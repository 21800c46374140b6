"""Launch planning: layouts, the tiling a configuration gives a call, and the kernels' integer counters.

Everything here depends only on shapes, strides, dtypes, the device and the configuration, so the forward
and backward plans compute it once per specialization and a later call with the same tensors only
allocates and launches.
"""

import functools
import math
import struct

import torch
import triton.language as tl

from .configs import KernelConfig, next_power_of_2

# Layout families (the kernels' LAYOUT constexpr): how a tile's element offsets are formed.
ROWS = 0  # the N and spatial dims collapse into one row dim: offset = row * row_stride + c * stride_c
PLANES = 1  # spatial positions contiguous: offset = n * stride_n + c * stride_c + s
STRIDED = 2  # any (n, c, s) strides: row r = n * S + s, taken apart by a division per row
LAYOUT_NAMES = {ROWS: "rows", PLANES: "planes", STRIDED: "strided"}

_CPU_PROGRAMS = 24  # programs of a looped launch under the interpreter (small, so tests cross splits)
_MERGE_TILE = {"cuda": 2048, "cpu": 32}  # partials merged per step, [SPLIT_BLOCK, BLOCK_C]
_INT32_LIMIT = 2**31 - 1
# Counters per (device, stream): slot 0 is the persistent variant's grid barrier, slot 1 + b the ticket of
# channel block b. Every launch leaves them fit for the next (tickets back at 0; the barrier's count at 0 or
# 2**31, which it works from alike), so one buffer, zeroed once, serves every launch on its stream.
_COUNTERS: dict = {}
_COUNTER_SLOTS = 4096


@functools.cache
def _multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int | None:
    """The multiprocessors of the GPU a call on ``device`` runs on; None where the kernels are interpreted.
    (`tritonbn-perf compile-check` replaces this to plan for a GPU it does not have.)"""
    if device.type != "cuda":
        return None
    return _multiprocessor_count(device_index(device))


def device_index(device: torch.device):
    """The CUDA device index a kernel on ``device`` runs on, or None off CUDA."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _collapsed_stride(sizes, strides):
    """The one stride that steps through dims ``sizes`` (outermost first) in order, or None where no single
    stride does; dims of size 1 are skipped, and no dims at all step by 1."""
    dims = [(size, step) for size, step in zip(sizes, strides) if size != 1]
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != inner_stride * inner_size:
            return None
    return dims[-1][1] if dims else 1


def ncs_strides(shape, stride):
    """Strides (n, c, s) that address a tensor as (N, C, S), or None if its spatial dims don't collapse."""
    spatial = _collapsed_stride(shape[2:], stride[2:])
    return None if spatial is None else (stride[0], stride[1], spatial)


def contiguous_strides(shape) -> tuple[int, ...]:
    """The strides of a row-major contiguous tensor of ``shape`` (what ``.contiguous()`` gives a copy)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def operand_layout(shape, stride) -> tuple[tuple[int, int, int], bool]:
    """How the kernels address a tensor of ``shape`` and ``stride`` that a call reads: (its (n, c, s) strides,
    False), or, where its spatial dims do not collapse to one stride, (the strides of its contiguous copy,
    True): such a tensor is read from ``.contiguous()``. The one rule for x, the residual and dy alike."""
    ncs = ncs_strides(shape, stride)
    if ncs is None:
        return ncs_strides(shape, contiguous_strides(shape)), True
    return ncs, False


def vector_stride(t) -> int | None:
    """The element stride of a per-channel tensor ``t`` (C elements, any shape), 0 for None; None where its
    elements are not equally spaced (then it is read, and written, through a dense copy)."""
    return 0 if t is None else _collapsed_stride(t.shape, t.stride())


def output_layout(shape, stride) -> tuple[tuple[int, ...], bool]:
    """(strides of the output for an input of ``shape``/``stride``, whether the input must be copied first).

    The output is ``empty_like`` the input as the kernels see it: the input itself when its spatial dims
    collapse to one stride, else its contiguous copy. The fake implementations use this too, so compiled
    and eager outputs have the same strides.
    """
    if ncs_strides(shape, stride) is None:
        return contiguous_strides(shape), True
    # The strides torch.empty_like gives: the input's own when it is dense, else a dense layout in its order.
    return torch.empty_like(torch.empty_strided(shape, stride, device="meta")).stride(), False


def spatial_size(shape) -> int:
    return math.prod(shape[2:])


def _rows_collapse(N, S, ncs) -> bool:
    return N == 1 or S == 1 or ncs[0] == S * ncs[2]


def layout_family(N, S, all_ncs) -> int:
    """The fastest addressing every tensor of a call supports: channel-contiguous rows, spatial planes, or
    any strides. Zero strides (an expanded gradient) are fine: they collapse like any other."""
    if all(ncs[1] == 1 and _rows_collapse(N, S, ncs) for ncs in all_ncs):
        return ROWS
    if S > 1 and all(ncs[2] == 1 for ncs in all_ncs):
        return PLANES
    if all(_rows_collapse(N, S, ncs) for ncs in all_ncs):
        return ROWS
    return STRIDED


def kernel_strides(layout: int, S: int, ncs) -> tuple[int, int, int]:
    """The three strides a kernel gets for one tensor: (row or n stride, c stride, s stride)."""
    if layout == ROWS:
        return (ncs[2] if S > 1 else ncs[0]), ncs[1], 0
    return ncs


def needs_int64(shape, all_ncs) -> bool:
    """Whether some element offset (or row index) of a call's tensors passes int32."""
    N, C, S = shape[0], shape[1], spatial_size(shape)
    if N * S + 2**16 > _INT32_LIMIT:
        return True
    return any((N - 1) * abs(n) + (C - 1) * abs(c) + (S - 1) * abs(s) + 2**16 > _INT32_LIMIT for n, c, s in all_ncs)


class Tiling:
    """The grid, tile and split of a call under ``config``, in layout family ``layout``.

    Programs are (channel block, split); a split is a run of consecutive tiles. The ``persistent`` variant
    gives every program exactly one tile, and needs all its programs resident at once.
    """

    def __init__(self, config: KernelConfig, layout: int, N: int, C: int, S: int, device: torch.device):
        self.config = config
        self.layout = STRIDED if config.addressing == "strided" else layout
        self.block_c = min(config.block_c, next_power_of_2(max(C, 1)))
        self.block_s = config.block_s if self.layout == PLANES else 1
        self.block_r = config.block_r
        if self.layout == PLANES:
            block_n = self.block_r // self.block_s
            self.s_tiles = cdiv(S, self.block_s)
            self.num_tiles = cdiv(max(N, 1), block_n) * self.s_tiles
        else:
            self.s_tiles = 1
            self.num_tiles = cdiv(max(N * S, 1), self.block_r)
        self.channel_blocks = cdiv(max(C, 1), self.block_c)
        self.multiprocessors = sms = multiprocessors(device)
        if config.variant == "persistent":
            self.tiles_per_split = 1
            if sms is not None:
                resident = int(config.programs_per_sm * sms)
                if self.channel_blocks * self.num_tiles > resident:
                    raise ValueError(f"persistent configuration {config} needs {self.channel_blocks * self.num_tiles} "
                                     f"resident programs for this shape; at most {resident} are assumed resident")
        else:
            programs = _CPU_PROGRAMS if sms is None else int(config.programs_per_sm * sms)
            splits = max(1, min(self.num_tiles, cdiv(programs, self.channel_blocks)))
            self.tiles_per_split = cdiv(self.num_tiles, splits)
        self.num_splits = cdiv(self.num_tiles, self.tiles_per_split)
        merge_tile = _MERGE_TILE["cpu" if sms is None else "cuda"]
        self.split_block = min(next_power_of_2(self.num_splits), max(1, merge_tile // self.block_c))
        self.grid = (self.channel_blocks, self.num_splits)
        self.num_warps = config.num_warps

    def sizes(self, N: int, C: int, S: int) -> tuple[int, ...]:
        """The kernels' size arguments: R, N, C, S, s_tiles, num_tiles, tiles_per_split."""
        return N * S, N, C, S, self.s_tiles, self.num_tiles, self.tiles_per_split

    def constexprs(self, index_i64: bool, compute) -> tuple:
        """The kernels' trailing tile constexprs: LAYOUT, SPLIT_BLOCK, BLOCK_R, BLOCK_C, BLOCK_S, INDEX_I64,
        COMPUTE."""
        return self.layout, self.split_block, self.block_r, self.block_c, self.block_s, index_i64, compute


def counters(device: torch.device, stream, slots: int) -> torch.Tensor:
    """The zeroed int32 counters of ``device`` and ``stream`` (a raw CUDA stream, None off CUDA), at least
    ``slots`` of them.

    A buffer is zeroed once, when first needed on a stream, and each launch leaves it as it found it. Inside a
    CUDA-graph capture a new buffer's zeroing would be recorded but not run, so there a call that finds no
    buffer gets a fresh one of its own, which the graph zeroes each replay.
    """
    key = (device, stream)
    found = _COUNTERS.get(key)
    if found is not None and found[1] >= slots:
        return found[0]
    size = max(slots, _COUNTER_SLOTS)
    buffer = torch.zeros(size, dtype=torch.int32, device=device)
    if stream is None or not torch.cuda.is_current_stream_capturing():
        _COUNTERS[key] = buffer, size
    return buffer


def dense_vectors(strides, *vectors):
    """The per-channel tensors ``vectors``, each whose stride (``vector_stride``) is None as a dense copy (the
    kernels then address it with stride 1), the others as they are."""
    return tuple(t.contiguous() if step is None else t for t, step in zip(vectors, strides))


def compute_dtype(dtype: torch.dtype):
    """The Triton dtype of the arithmetic: float64 for float64 input, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=256)
def float_args(*values: float) -> tuple[float, ...]:
    """``values`` as the kernels take them, each a float32 head and tail (``split_float``): one cached look-up for
    all of a call's floats."""
    return tuple(part for value in values for part in split_float(value))


@functools.lru_cache(maxsize=256)
def split_float(value: float) -> tuple[float, float]:
    """A float as a float32 head plus the rest: Triton passes Python floats as float32, so float64
    kernels rebuild the value from both (to about 48 bits)."""
    head = struct.unpack("f", struct.pack("f", value))[0]
    return head, value - head
