"""Kernel configurations as data: which variant, tile and warps a call runs with.

A configuration is chosen per direction ("fwd": training forward, "bwd": backward, "eval": eval forward),
dtype, layout, channel count C and row count R (= N * spatial size). The tuning table (``tuning.json``
beside this file, written by ``tritonbn-perf tune`` on a GPU) maps ranges of those to the configuration that
measured fastest on that GPU; where the table has no entry (another GPU, an untuned shape) a heuristic
picks one. The heuristic only picks the ``ticket`` variant: ``merge`` and ``persistent`` run only where a
GPU measurement put them in the table.

Variants (see forward.py and backward.py for the kernels):
- ``ticket``: two launches per direction; the first writes per-split partial results and the last program
  of each channel block (an integer ticket, no float atomics) finalizes that block's statistics once;
  the second normalises (forward) or writes the input gradient (backward).
- ``merge``: the same two launches, but every program of the second merges the partials itself (what the
  kernels did before the ticket existed); with ``addressing="strided"`` and the old tiling it is the
  previous release's kernels, kept so that a tuning run compares old and new.
- ``persistent``: one launch; each program holds a single tile in registers across a grid-wide barrier
  (a cooperative launch, so every program is resident at once), so x (and dy) are read from memory once.
  Only for tensors small enough that one tile per program covers them with the GPU's resident programs.
"""

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("tuning.json")

VARIANTS = ("ticket", "merge", "persistent")
DIRECTIONS = ("fwd", "bwd", "eval")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

# The interpreter runs programs one after another in Python: small tiles keep the tests quick and make
# small test shapes cross tile, split and channel-block boundaries.
_CPU_TILE_ELEMENTS = 256
_CPU_PROGRAMS = 24
# On a GPU: 16 KB tiles (8 warps' worth of 16-byte vectors, several in flight per thread) and two
# programs per multiprocessor for the looped variants.
_GPU_TILE_BYTES = 16384
_GPU_PROGRAMS_PER_SM = 2
# The most bytes of its tile a thread of a candidate may hold: ptxas -v for sm_90 (triton 3.6 and 3.9,
# `tritonbn-perf compile-check --resources`) shows backward's partials kernels spilling kilobytes a thread
# beyond it (bf16 channels_last 128x128 with 4 warps, 256 bytes a thread: 11 KB of spill stores; fp32 NCHW 8192
# with 4 warps, 256 bytes: 1.5 KB) and at most a few hundred bytes at it.
MAX_TILE_BYTES_PER_THREAD = 128


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How one direction of one call runs. ``block_r`` rows x ``block_c`` channels per tile; for the
    planes layout (NCHW) a tile's rows are ``block_r // block_s`` samples x ``block_s`` spatial positions."""

    variant: str = "ticket"
    block_r: int = 64
    block_c: int = 64
    block_s: int = 1
    num_warps: int = 4
    programs_per_sm: float = _GPU_PROGRAMS_PER_SM  # looped variants: programs of a launch per multiprocessor
    addressing: str = "native"  # "native": per layout; "strided": any (n, c, s) strides, rows split by division

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.addressing not in ("native", "strided"):
            raise ValueError(f"unknown addressing {self.addressing!r}")
        for name in ("block_r", "block_c", "block_s", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.block_s > self.block_r:
            raise ValueError(f"block_s ({self.block_s}) cannot exceed block_r ({self.block_r})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


@functools.cache
def _table() -> tuple[dict, ...]:
    if not TABLE_PATH.exists():
        return ()
    return tuple(json.loads(TABLE_PATH.read_text())["entries"])


def table_entry(gpu: str | None, direction: str, dtype: torch.dtype, layout: str, C: int, R: int):
    """The tuning table's configuration for this case, or None."""
    if gpu is None:
        return None
    for entry in _table():
        if (entry["gpu"] == gpu and entry["direction"] == direction and entry["dtype"] == DTYPE_NAMES[dtype]
                and entry["layout"] == layout and entry["c_min"] <= C <= entry["c_max"]
                and entry["r_min"] <= R <= entry["r_max"]):
            return KernelConfig(**entry["config"])
    return None


def heuristic(direction: str, dtype: torch.dtype, layout: str, N: int, C: int, S: int, on_gpu: bool) -> KernelConfig:
    """A ``ticket`` configuration for any GPU (or the interpreter's small tiles on a CPU)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    tile = _GPU_TILE_BYTES // itemsize if on_gpu else _CPU_TILE_ELEMENTS
    if layout == "planes":  # one channel a program, tiles of whole spatial runs (vector loads along s)
        block_s = min(next_power_of_2(S), tile)
        block_r = block_s * min(next_power_of_2(N), tile // block_s)
        return KernelConfig("ticket", block_r, 1, block_s, 4 if block_r * itemsize <= 8192 else 8)
    # Channel-contiguous rows: row segments of up to 256 bytes (at least 128 where C allows), 16 on a CPU.
    block_c = min(next_power_of_2(C), 256 // itemsize if on_gpu else 16)
    block_r = min(next_power_of_2(max(N * S, 1)), max(1, tile // block_c))
    warps = 4 if block_r * block_c * itemsize <= 8192 else 8
    return KernelConfig("ticket", block_r, block_c, 1, warps)


_OVERRIDE = contextvars.ContextVar("tritonbn_config_override", default=None)
_AS_GPU = contextvars.ContextVar("tritonbn_plan_as_gpu", default=False)


@contextlib.contextmanager
def as_gpu():
    """Inside the block, calls on any device get the heuristic's GPU configuration (`tritonbn-perf compile-check`
    compiles for a GPU what the plans of CPU tensors would launch there)."""
    token = _AS_GPU.set(True)
    try:
        yield
    finally:
        _AS_GPU.reset(token)


@contextlib.contextmanager
def override(config: KernelConfig):
    """Plan every call made inside the block with ``config`` (``tritonbn-perf tune`` and the tests). Plans
    are cached per specialization: plan anew inside the block (tritonbn.plans.clear())."""
    token = _OVERRIDE.set(config)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def choose(direction: str, dtype: torch.dtype, layout: str, N: int, C: int, S: int,
           device: torch.device) -> KernelConfig:
    forced = _OVERRIDE.get()
    if forced is not None:
        return forced
    config = table_entry(gpu_name(device), direction, dtype, layout, C, N * S)
    return config or heuristic(direction, dtype, layout, N, C, S, device.type == "cuda" or _AS_GPU.get())


def candidates(direction: str, dtype: torch.dtype, layout: str, N: int, C: int, S: int,
               multiprocessors: int | None) -> list[KernelConfig]:
    """The configurations ``tritonbn-perf tune`` compares for one case on a GPU with ``multiprocessors`` SMs
    (None: the interpreter's small tiles): the heuristic's, tile and warp variations of it, the ``merge``
    variant, the previous release's kernels, and ``persistent`` where one tile per program covers the tensor."""
    on_gpu = multiprocessors is not None
    base = heuristic(direction, dtype, layout, N, C, S, on_gpu)
    found = [base]
    itemsize = torch.empty((), dtype=dtype).element_size()

    def add(**changes):
        try:
            config = dataclasses.replace(base, **changes)
        except ValueError:
            return
        if config.block_r * config.block_c * itemsize > MAX_TILE_BYTES_PER_THREAD * 32 * config.num_warps:
            return  # it would spill (see MAX_TILE_BYTES_PER_THREAD): slower than its neighbours, not worth timing
        if config not in found:
            found.append(config)

    for warps in (4, 8):
        add(num_warps=warps, block_r=base.block_r * 2)
        add(num_warps=warps, block_r=max(base.block_s, base.block_r // 2))
    if layout != "planes":
        add(block_c=min(next_power_of_2(C), max(1, 128 // itemsize)) if on_gpu else min(base.block_c, 4),
            block_r=base.block_r * 2)
    add(programs_per_sm=4)
    if direction != "eval":
        add(variant="merge")
        add(variant="merge", **previous_release(layout, C, on_gpu))
        persistent = persistent_config(base, N, C, S, multiprocessors or 12)
        if persistent is not None:
            found.append(persistent)
    return found


def previous_release(layout: str, C: int, on_gpu: bool) -> dict:
    """The previous release's tiling (4096-element tiles of 16 to 64 channels, (n, c, s) strides)."""
    tile = 4096 if on_gpu else 256
    if layout == "planes":
        return {"addressing": "strided", "block_c": 1, "block_s": 1, "block_r": tile}
    block_c = min(next_power_of_2(C), 64 if on_gpu else 16)
    return {"addressing": "strided", "block_c": block_c, "block_s": 1, "block_r": max(1, tile // block_c),
            "num_warps": 4}


# Programs resident at once per multiprocessor that the persistent variant assumes (its launch is cooperative:
# it fails rather than hangs if they are not), and the elements a program holds across the barrier (backward
# holds two such tiles, dz and x - mean, in float32).
PERSISTENT_PROGRAMS_PER_SM = 2
PERSISTENT_MAX_TILE = 8192
PERSISTENT_MIN_ROWS = 16


def persistent_config(base: KernelConfig, N: int, C: int, S: int, multiprocessors: int):
    """A persistent configuration covering the tensor with one tile per program, or None if it is too big."""
    programs = PERSISTENT_PROGRAMS_PER_SM * multiprocessors
    channel_blocks = math.ceil(C / base.block_c)
    if channel_blocks > programs:
        return None
    per_program = programs // channel_blocks
    if base.block_s > 1:  # planes: a tile is whole runs of block_s positions of some samples
        block_r = base.block_s * next_power_of_2(math.ceil(N * math.ceil(S / base.block_s) / per_program))
    else:  # at least 16 rows: thinner tiles leave most of a program idle
        block_r = max(PERSISTENT_MIN_ROWS, next_power_of_2(math.ceil(N * S / per_program)))
    if block_r * base.block_c > PERSISTENT_MAX_TILE:
        return None
    return dataclasses.replace(base, variant="persistent", block_r=block_r, programs_per_sm=PERSISTENT_PROGRAMS_PER_SM,
                               num_warps=8 if block_r * base.block_c > 2048 else 4)
