"""Fused batch norm + residual add + activation: Triton kernels and their launchers.

Every tensor is addressed as a 3-D view (N, C, S), S being all spatial dims collapsed, through its own
three strides. Contiguous NC..., channels_last and channels_last_3d all collapse that way, so they run
natively; only views whose spatial dims cannot be collapsed are copied first. A program owns a tile of
BLOCK_C channels and a contiguous slice (a "split") of the N*S reduction rows, and loops over it in
BLOCK_R-row steps. Reductions write one partial per (split, channel); a second, tiny kernel combines the
partials in split order, so results are bitwise reproducible (no atomics).

Traffic per call, in passes over one activation tensor (the residual adds its own):
  training forward: read x (statistics), read x + write y (normalise)        = 3
  eval forward:     read x + write y                                         = 2
  backward:         read dy, x (reductions), read dy, x + write dx (input)   = 5
Backward recomputes the pre-activation from x and the per-channel mean/rstd instead of saving it. With a
residual, the reduction pass also reads it and writes dz (the residual's gradient), and the input pass
then reads dz instead of dy and the residual: 5 + 1 read + 1 write.
"""

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from .activations import ACTIVATION_IDS, IDENTITY, activation_backward, activation_forward

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(rows, cols, S, stride_n, stride_c, stride_s):
    """Element offsets of a [BLOCK_R, BLOCK_C] tile; row r is sample r // S, spatial position r % S."""
    n = rows // S
    s = rows - n * S
    row_offsets = n.to(tl.int64) * stride_n + s.to(tl.int64) * stride_s
    return row_offsets[:, None] + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr):
    """This program's channels (axis 0 of the grid) and which of them exist."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _split_rows(rows_per_split, R, ROWS_I64: tl.constexpr):
    """First and end row of this program's split; int64 only when rows pass int32's range (rare, and
    int64 index arithmetic is slower)."""
    pid_split = tl.program_id(1)
    if ROWS_I64:
        pid_split = pid_split.to(tl.int64)
    row_start = pid_split * rows_per_split
    return row_start, tl.minimum(row_start + rows_per_split, R)


@triton.jit
def _scalar(hi, lo, like):
    """A float argument, passed as a float32 head and tail (about 48 bits: a few float64 ulps, where a
    single float32 would lose 29 bits), as a tensor shaped and typed like ``like``."""
    return (tl.zeros_like(like) + hi) + lo


@triton.jit
def _moments_partial_kernel(
    x_ptr,  # input, addressed as (N, C, S) through the three strides below
    part_mean_ptr,  # [num_splits, C] out: mean of each split's rows, per channel
    part_m2_ptr,  # [num_splits, C] out: sum of squared deviations from that mean
    R,  # number of reduction rows, N * S
    C,  # number of channels
    S,  # spatial size (product of the dims after C; 1 for 2-D input)
    stride_n, stride_c, stride_s,  # strides of x
    rows_per_split,  # rows each split owns; a multiple of BLOCK_R
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # channels per tile
    ROWS_I64: tl.constexpr,  # row indices need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = _channel_block(C, BLOCK_C)
    row_start, row_end = _split_rows(rows_per_split, R, ROWS_I64)

    count = tl.zeros([BLOCK_C], dtype=COMPUTE)
    mean = tl.zeros([BLOCK_C], dtype=COMPUTE)
    m2 = tl.zeros([BLOCK_C], dtype=COMPUTE)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + _tile_offsets(rows, cols, S, stride_n, stride_c, stride_s), mask=mask, other=0.0)
        x = x.to(COMPUTE)
        # Two-pass moments of the tile (exact for large means), merged with Chan et al.'s formula.
        tile_count = tl.minimum(row_end - start, BLOCK_R).to(COMPUTE)
        tile_mean = tl.sum(x, axis=0) / tile_count
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        total = count + tile_count
        delta = tile_mean - mean
        weight = tile_count / total
        mean += delta * weight
        m2 += tile_m2 + delta * delta * count * weight
        count = total

    out = tl.program_id(1) * C + cols
    tl.store(part_mean_ptr + out, mean, mask=col_mask)
    tl.store(part_m2_ptr + out, m2, mask=col_mask)


@triton.jit
def _moments_finalize_kernel(
    part_mean_ptr,  # [num_splits, C] per-split means from _moments_partial_kernel
    part_m2_ptr,  # [num_splits, C] per-split sums of squared deviations
    mean_ptr,  # [C] out: batch mean
    rstd_ptr,  # [C] out: 1 / sqrt(biased variance + eps)
    m2_ptr,  # [C] out when STORE_M2: total sum of squared deviations
    running_mean_ptr,  # [C] updated in place when UPDATE_RUNNING
    running_var_ptr,  # [C] updated in place (unbiased variance) when UPDATE_RUNNING
    C,  # number of channels
    rows_per_split,  # rows each split owned
    last_split_rows,  # rows the last split owned (the remainder)
    num_splits,  # number of partials per channel
    eps_hi, eps_lo,  # eps as a float32 head and tail
    momentum_hi, momentum_lo,  # running-average factor as a float32 head and tail
    STORE_M2: tl.constexpr,  # write m2_ptr
    UPDATE_RUNNING: tl.constexpr,  # update the running statistics
    BLOCK_C: tl.constexpr,  # channels per program
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = _channel_block(C, BLOCK_C)
    count = tl.zeros([BLOCK_C], dtype=COMPUTE)
    mean = tl.zeros([BLOCK_C], dtype=COMPUTE)
    m2 = tl.zeros([BLOCK_C], dtype=COMPUTE)
    # Merged in split order, always the same way, so the statistics are bitwise reproducible.
    for split in range(0, num_splits):
        split_count = tl.where(split == num_splits - 1, last_split_rows, rows_per_split).to(COMPUTE)
        split_mean = tl.load(part_mean_ptr + split * C + cols, mask=col_mask, other=0.0).to(COMPUTE)
        split_m2 = tl.load(part_m2_ptr + split * C + cols, mask=col_mask, other=0.0).to(COMPUTE)
        total = count + split_count
        delta = split_mean - mean
        weight = split_count / total
        mean += delta * weight
        m2 += split_m2 + delta * delta * count * weight
        count = total

    eps = _scalar(eps_hi, eps_lo, mean)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(rstd_ptr + cols, rstd, mask=col_mask)
    if STORE_M2:
        tl.store(m2_ptr + cols, m2, mask=col_mask)
    if UPDATE_RUNNING:
        momentum = _scalar(momentum_hi, momentum_lo, mean)
        running_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
        running_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
        unbiased_var = m2 / (count - 1.0)
        running_mean = running_mean + momentum * (mean - running_mean)
        running_var = running_var + momentum * (unbiased_var - running_var)
        tl.store(running_mean_ptr + cols, running_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
        tl.store(running_var_ptr + cols, running_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _load_channel_params(mean_ptr, rstd_ptr, weight_ptr, bias_ptr, slope_hi, slope_lo, cols, col_mask,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    """Per-channel mean, rstd, scale = weight * rstd and bias of a tile's channels, and the negative slope."""
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    rstd = tl.load(rstd_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    bias = tl.zeros_like(mean)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    return mean, rstd, scale, bias, _scalar(slope_hi, slope_lo, mean)


@triton.jit
def _forward_kernel(
    x_ptr,  # input
    y_ptr,  # out: act(normalised input * weight + bias [+ residual]), in the input's dtype
    residual_ptr,  # residual added before the activation (read when HAS_RESIDUAL)
    mean_ptr,  # [C] per-channel mean used to normalise
    rstd_ptr,  # [C] per-channel 1 / sqrt(var + eps)
    weight_ptr,  # [C] scale (read when HAS_WEIGHT)
    bias_ptr,  # [C] shift (read when HAS_BIAS)
    R, C, S,  # reduction rows (N * S), channels, spatial size
    x_stride_n, x_stride_c, x_stride_s,  # strides of x
    y_stride_n, y_stride_c, y_stride_s,  # strides of y
    r_stride_n, r_stride_c, r_stride_s,  # strides of the residual
    rows_per_split,  # rows each program owns; a multiple of BLOCK_R
    slope_hi, slope_lo,  # leaky_relu's negative slope as a float32 head and tail
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # activation id, see activations.py
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile shape
    ROWS_I64: tl.constexpr,  # row indices need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = _channel_block(C, BLOCK_C)
    mean, rstd, scale, bias, negative_slope = _load_channel_params(
        mean_ptr, rstd_ptr, weight_ptr, bias_ptr, slope_hi, slope_lo, cols, col_mask, HAS_WEIGHT, HAS_BIAS,
        COMPUTE)
    row_start, row_end = _split_rows(rows_per_split, R, ROWS_I64)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + _tile_offsets(rows, cols, S, x_stride_n, x_stride_c, x_stride_s),
                    mask=mask, other=0.0).to(COMPUTE)
        # (x - mean) first: folding mean into the shift would cancel catastrophically for large means.
        z = (x - mean[None, :]) * scale[None, :] + bias[None, :]
        if HAS_RESIDUAL:
            r_offsets = _tile_offsets(rows, cols, S, r_stride_n, r_stride_c, r_stride_s)
            z += tl.load(residual_ptr + r_offsets, mask=mask, other=0.0).to(COMPUTE)
        y = activation_forward(z, negative_slope, ACTIVATION)
        y_offsets = _tile_offsets(rows, cols, S, y_stride_n, y_stride_c, y_stride_s)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pre_activation_grad(dy_ptr, x_ptr, residual_ptr, offsets_dy, offsets_x, offsets_r, mask,
                         mean, rstd, scale, bias, negative_slope,
                         HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr):
    """(dz, xhat) of a tile: dz = dy * act'(z), z recomputed from x and the channel statistics."""
    dy = tl.load(dy_ptr + offsets_dy, mask=mask, other=0.0).to(COMPUTE)
    x = tl.load(x_ptr + offsets_x, mask=mask, other=0.0).to(COMPUTE)
    xhat = (x - mean[None, :]) * rstd[None, :]
    dz = dy
    if ACTIVATION != IDENTITY:
        z = (x - mean[None, :]) * scale[None, :] + bias[None, :]
        if HAS_RESIDUAL:
            z += tl.load(residual_ptr + offsets_r, mask=mask, other=0.0).to(COMPUTE)
        dz = activation_backward(dy, z, negative_slope, ACTIVATION)
    return dz, xhat


@triton.jit
def _backward_reduce_kernel(
    dy_ptr,  # gradient of the output
    x_ptr,  # input saved from the forward
    residual_ptr,  # residual saved from the forward (read when HAS_RESIDUAL and the activation needs z)
    mean_ptr, rstd_ptr,  # [C] statistics the forward normalised with
    weight_ptr, bias_ptr,  # [C] affine parameters (read when HAS_WEIGHT / HAS_BIAS)
    part_dz_ptr,  # [num_splits, C] out: per-split sum of dz
    part_dz_xhat_ptr,  # [num_splits, C] out: per-split sum of dz * xhat
    dz_ptr,  # out when STORE_DZ: dz itself, which is the residual's gradient
    R, C, S,  # reduction rows (N * S), channels, spatial size
    dy_stride_n, dy_stride_c, dy_stride_s,  # strides of dy
    x_stride_n, x_stride_c, x_stride_s,  # strides of x
    r_stride_n, r_stride_c, r_stride_s,  # strides of the residual
    dz_stride_n, dz_stride_c, dz_stride_s,  # strides of dz
    rows_per_split,  # rows each program owns; a multiple of BLOCK_R
    slope_hi, slope_lo,  # leaky_relu's negative slope as a float32 head and tail
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_DZ: tl.constexpr,  # write dz, so the input-gradient pass reads it instead of dy and the residual
    ACTIVATION: tl.constexpr,  # activation id, see activations.py
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile shape
    ROWS_I64: tl.constexpr,  # row indices need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = _channel_block(C, BLOCK_C)
    mean, rstd, scale, bias, negative_slope = _load_channel_params(
        mean_ptr, rstd_ptr, weight_ptr, bias_ptr, slope_hi, slope_lo, cols, col_mask, HAS_WEIGHT, HAS_BIAS,
        COMPUTE)
    sum_dz = tl.zeros([BLOCK_C], dtype=COMPUTE)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=COMPUTE)
    row_start, row_end = _split_rows(rows_per_split, R, ROWS_I64)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        dz, xhat = _pre_activation_grad(
            dy_ptr, x_ptr, residual_ptr,
            _tile_offsets(rows, cols, S, dy_stride_n, dy_stride_c, dy_stride_s),
            _tile_offsets(rows, cols, S, x_stride_n, x_stride_c, x_stride_s),
            _tile_offsets(rows, cols, S, r_stride_n, r_stride_c, r_stride_s),
            mask, mean, rstd, scale, bias, negative_slope, HAS_RESIDUAL, ACTIVATION, COMPUTE)
        if STORE_DZ:
            dz_offsets = _tile_offsets(rows, cols, S, dz_stride_n, dz_stride_c, dz_stride_s)
            tl.store(dz_ptr + dz_offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xhat += tl.sum(dz * xhat, axis=0)
    out = tl.program_id(1) * C + cols
    tl.store(part_dz_ptr + out, sum_dz, mask=col_mask)
    tl.store(part_dz_xhat_ptr + out, sum_dz_xhat, mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    part_a_ptr, part_b_ptr,  # [num_splits, C] partial sums of two per-channel quantities
    sum_a_ptr, sum_b_ptr,  # [C] out: their totals, added in split order
    C,  # number of channels
    num_splits,  # number of partials per channel
    BLOCK_C: tl.constexpr,  # channels per program
    COMPUTE: tl.constexpr,  # accumulation dtype
):
    cols, col_mask = _channel_block(C, BLOCK_C)
    sum_a = tl.zeros([BLOCK_C], dtype=COMPUTE)
    sum_b = tl.zeros([BLOCK_C], dtype=COMPUTE)
    for split in range(0, num_splits):
        sum_a += tl.load(part_a_ptr + split * C + cols, mask=col_mask, other=0.0).to(COMPUTE)
        sum_b += tl.load(part_b_ptr + split * C + cols, mask=col_mask, other=0.0).to(COMPUTE)
    tl.store(sum_a_ptr + cols, sum_a, mask=col_mask)
    tl.store(sum_b_ptr + cols, sum_b, mask=col_mask)


@triton.jit
def _backward_input_kernel(
    dy_ptr,  # gradient of the output (read unless LOAD_DZ)
    x_ptr,  # input saved from the forward
    residual_ptr,  # residual saved from the forward (read when HAS_RESIDUAL and the activation needs z)
    mean_ptr, rstd_ptr,  # [C] statistics the forward normalised with
    weight_ptr, bias_ptr,  # [C] affine parameters (read when HAS_WEIGHT / HAS_BIAS)
    sum_dz_ptr, sum_dz_xhat_ptr,  # [C] totals from the reduction (read when TRAINING)
    dx_ptr,  # out when STORE_DX: gradient of the input
    dz_ptr,  # dz = dy * act'(z), the residual's gradient: written when STORE_DZ, read when LOAD_DZ
    count,  # number of values each channel's statistics were taken over
    R, C, S,  # reduction rows (N * S), channels, spatial size
    dy_stride_n, dy_stride_c, dy_stride_s,  # strides of dy
    x_stride_n, x_stride_c, x_stride_s,  # strides of x
    r_stride_n, r_stride_c, r_stride_s,  # strides of the residual
    dx_stride_n, dx_stride_c, dx_stride_s,  # strides of dx
    dz_stride_n, dz_stride_c, dz_stride_s,  # strides of dz
    rows_per_split,  # rows each program owns; a multiple of BLOCK_R
    slope_hi, slope_lo,  # leaky_relu's negative slope as a float32 head and tail
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    TRAINING: tl.constexpr,  # statistics came from the batch, so dx has the mean/variance terms
    STORE_DX: tl.constexpr, STORE_DZ: tl.constexpr, LOAD_DZ: tl.constexpr,
    ACTIVATION: tl.constexpr,  # activation id, see activations.py
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile shape
    ROWS_I64: tl.constexpr,  # row indices need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = _channel_block(C, BLOCK_C)
    mean, rstd, scale, bias, negative_slope = _load_channel_params(
        mean_ptr, rstd_ptr, weight_ptr, bias_ptr, slope_hi, slope_lo, cols, col_mask, HAS_WEIGHT, HAS_BIAS,
        COMPUTE)
    mean_dz = tl.zeros_like(mean)
    mean_dz_xhat = tl.zeros_like(mean)
    if TRAINING:
        # Promote through a COMPUTE tensor: the int may arrive as a constexpr (Triton specialises 1).
        inv_count = 1.0 / (tl.zeros_like(mean) + count)
        mean_dz = tl.load(sum_dz_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE) * inv_count
        mean_dz_xhat = tl.load(sum_dz_xhat_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE) * inv_count
    row_start, row_end = _split_rows(rows_per_split, R, ROWS_I64)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x_offsets = _tile_offsets(rows, cols, S, x_stride_n, x_stride_c, x_stride_s)
        dz_offsets = _tile_offsets(rows, cols, S, dz_stride_n, dz_stride_c, dz_stride_s)
        if LOAD_DZ:
            dz = tl.load(dz_ptr + dz_offsets, mask=mask, other=0.0).to(COMPUTE)
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(COMPUTE)
            xhat = (x - mean[None, :]) * rstd[None, :]
        else:
            dz, xhat = _pre_activation_grad(
                dy_ptr, x_ptr, residual_ptr,
                _tile_offsets(rows, cols, S, dy_stride_n, dy_stride_c, dy_stride_s), x_offsets,
                _tile_offsets(rows, cols, S, r_stride_n, r_stride_c, r_stride_s),
                mask, mean, rstd, scale, bias, negative_slope, HAS_RESIDUAL, ACTIVATION, COMPUTE)
        if STORE_DZ:
            tl.store(dz_ptr + dz_offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if STORE_DX:
            if TRAINING:
                dx = (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]) * scale[None, :]
            else:
                dx = dz * scale[None, :]
            dx_offsets = _tile_offsets(rows, cols, S, dx_stride_n, dx_stride_c, dx_stride_s)
            tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launch planning
# --------------------------------------------------------------------------------------------------

# The interpreter runs one program after another in Python: small tiles keep tests quick and make
# small test shapes cross tile and split boundaries; GPUs want big tiles and several programs per SM.
_TILE_ELEMENTS = {"cuda": 4096, "cpu": 512}
_PROGRAMS_PER_SM = 4
_CPU_PROGRAMS = 32
_MAX_CHANNEL_BLOCK = {"cuda": 64, "cpu": 16}


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _PROGRAMS_PER_SM * _multiprocessor_count(index)
    return _CPU_PROGRAMS


# Plain-int versions of triton.cdiv / next_power_of_2, which cost microseconds a call on the host.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Plan:
    """Tile shape and the split of the N*S rows across programs, shared by every kernel of a call."""

    def __init__(self, R: int, C: int, channels_contiguous: bool, device: torch.device):
        R = max(R, 1)  # an empty batch launches no row loop, but the partial buffers need a shape
        kind = "cuda" if device.type == "cuda" else "cpu"
        tile = _TILE_ELEMENTS[kind]
        if channels_contiguous and C > 1:
            # channels_last / (N, C): a tile spans neighbouring channels, which are adjacent in memory.
            self.block_c = min(_next_power_of_2(C), _MAX_CHANNEL_BLOCK[kind])
        else:
            self.block_c = 1
        self.block_r = max(1, min(tile // self.block_c, _next_power_of_2(R)))
        channel_blocks = _cdiv(C, self.block_c)
        splits = max(1, min(_cdiv(R, self.block_r), _target_programs(device) // channel_blocks))
        self.rows_per_split = _cdiv(_cdiv(R, splits), self.block_r) * self.block_r
        self.num_splits = _cdiv(R, self.rows_per_split)
        # The last split's end row and tile must stay inside int32, or the kernels index in int64.
        self.rows_i64 = self.num_splits * self.rows_per_split + self.block_r >= 2**31
        self.grid = (channel_blocks, self.num_splits)
        self.reduce_grid = (channel_blocks,)
        self.num_warps = 4 if self.block_r * self.block_c <= 2048 else 8


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _ncs_strides(t: torch.Tensor):
    """Strides (n, c, s) that address ``t`` as (N, C, S), or None if its spatial dims don't collapse."""
    spatial = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    for (_, outer_stride), (inner_size, inner_stride) in zip(spatial, spatial[1:]):
        if outer_stride != inner_stride * inner_size:
            return None
    stride_s = spatial[-1][1] if spatial else 1
    return t.stride(0), t.stride(1), stride_s


def as_addressable(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` with its (n, c, s) strides; copied to contiguous only when no such strides exist."""
    strides = _ncs_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _ncs_strides(t)
    return t, strides


def _compute_dtype(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _split_float(value: float) -> tuple[float, float]:
    """A float as a float32 head plus the rest: Triton passes Python floats as float32, so float64
    kernels rebuild the value from both (to about 48 bits)."""
    head = struct.unpack("f", struct.pack("f", value))[0]
    return head, value - head


def _dims(x: torch.Tensor) -> tuple[int, int, int]:
    """(R, C, S): reduction rows N * S, channels, spatial size."""
    S = math.prod(x.shape[2:])
    return x.shape[0] * S, x.shape[1], S


def _plan_for(x: torch.Tensor, x_strides) -> _Plan:
    R, C, _ = _dims(x)
    return _cached_plan(R, C, x_strides[1] == 1, x.device)


# Training steps repeat the same shapes: planning once per shape keeps the host's per-call work small.
@functools.lru_cache(maxsize=1024)
def _cached_plan(R: int, C: int, channels_contiguous: bool, device: torch.device) -> _Plan:
    return _Plan(R, C, channels_contiguous, device)


def _activation_id(activation: str) -> int:
    try:
        return ACTIVATION_IDS[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATION_IDS)}") from None


def _moments(x, x_strides, plan, eps, running_mean=None, running_var=None, momentum=0.0, store_m2=False):
    """Batch (mean, rstd, m2) per channel; updates the running statistics when they are given."""
    R, C, S = _dims(x)
    stats_dtype = _stats_dtype(x)
    compute = _compute_dtype(x)
    if R == 0:
        # An empty batch has no statistics: PyTorch leaves the running ones as they are.
        mean = torch.zeros(C, dtype=stats_dtype, device=x.device)
        return mean, torch.full_like(mean, eps).rsqrt(), torch.zeros_like(mean)
    part_mean = torch.empty((plan.num_splits, C), dtype=stats_dtype, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    _moments_partial_kernel[plan.grid](
        x, part_mean, part_m2, R, C, S, *x_strides, plan.rows_per_split,
        BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, ROWS_I64=plan.rows_i64, COMPUTE=compute,
        num_warps=plan.num_warps)
    mean = torch.empty(C, dtype=stats_dtype, device=x.device)
    rstd = torch.empty_like(mean)
    m2 = torch.empty_like(mean) if store_m2 else mean
    update = running_mean is not None
    _moments_finalize_kernel[plan.reduce_grid](
        part_mean, part_m2, mean, rstd, m2,
        running_mean if update else mean, running_var if update else mean,
        C, plan.rows_per_split, R - (plan.num_splits - 1) * plan.rows_per_split, plan.num_splits,
        *_split_float(eps), *_split_float(momentum),
        STORE_M2=store_m2, UPDATE_RUNNING=update, BLOCK_C=plan.block_c, COMPUTE=compute)
    return mean, rstd, m2


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and sum of squared deviations (M2) over all but dim 1; count = numel / C."""
    x, x_strides = as_addressable(x)
    mean, _, m2 = _moments(x, x_strides, _plan_for(x, x_strides), eps=0.0, store_m2=True)
    return mean, m2


def _param_args(weight, bias, dummy):
    """Weight and bias pointers (dense), with ``dummy`` standing in for an absent one."""
    return (weight.contiguous() if weight is not None else dummy, bias.contiguous() if bias is not None else dummy)


def normalize_act(x, mean, rstd, weight, bias, activation, negative_slope, residual):
    """act((x - mean) * rstd * weight + bias [+ residual]) in one pass; output keeps x's layout.

    The output's dtype is x's, promoted with the residual's as ``bn(x) + residual`` would be.
    """
    x, x_strides = as_addressable(x)
    plan = _plan_for(x, x_strides)
    R, C, S = _dims(x)
    y = torch.empty_like(x, dtype=output_dtype(x, residual))
    if R == 0:
        return y
    y_strides = _ncs_strides(y)
    if residual is not None:
        residual, r_strides = as_addressable(residual)
    else:
        r_strides = (0, 0, 0)
    _forward_kernel[plan.grid](
        x, y, residual if residual is not None else x, mean, rstd, *_param_args(weight, bias, mean),
        R, C, S, *x_strides, *y_strides, *r_strides, plan.rows_per_split, *_split_float(negative_slope),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        ACTIVATION=_activation_id(activation), BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
        ROWS_I64=plan.rows_i64, COMPUTE=_compute_dtype(x), num_warps=plan.num_warps)
    return y


def forward_train(x, weight, bias, running_mean, running_var, momentum, eps, activation, negative_slope,
                  residual):
    """Training forward: batch statistics, running-stat update (if given), normalise, add, activate.

    Returns (y, mean, rstd); mean and rstd are what backward needs besides x (and the residual).
    """
    x, x_strides = as_addressable(x)
    plan = _plan_for(x, x_strides)
    dense_running = [t if t is None or t.is_contiguous() else t.contiguous() for t in (running_mean, running_var)]
    mean, rstd, _ = _moments(x, x_strides, plan, eps, *dense_running, momentum)
    for target, updated in zip((running_mean, running_var), dense_running):
        if updated is not target:  # the kernel updated a dense copy of a strided buffer
            target.copy_(updated)
    y = normalize_act(x, mean, rstd, weight, bias, activation, negative_slope, residual)
    return y, mean, rstd


def forward_eval(x, running_mean, running_var, weight, bias, eps, activation, negative_slope, residual):
    """Eval forward: running statistics folded per channel first, then one pointwise pass."""
    stats_dtype = _stats_dtype(x)
    mean = running_mean.to(stats_dtype)
    rstd = torch.rsqrt(running_var.to(stats_dtype) + eps)
    y = normalize_act(x, mean, rstd, weight, bias, activation, negative_slope, residual)
    return y, mean, rstd


def output_dtype(x: torch.Tensor, residual) -> torch.dtype:
    """The dtype of act(bn(x) + residual): x's, promoted with the residual's as PyTorch's add does."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _grad_operands(dy, x, residual, activation):
    """dy, x and (when the activation needs z) residual, each with its (n, c, s) strides."""
    dy, dy_strides = as_addressable(dy)
    x, x_strides = as_addressable(x)
    r_strides = (0, 0, 0)
    if residual is not None and ACTIVATION_IDS[activation] != IDENTITY.value:
        residual, r_strides = as_addressable(residual)
    else:
        residual = None
    return dy, dy_strides, x, x_strides, residual, r_strides


def backward_reduce(dy, x, mean, rstd, weight, bias, activation, negative_slope, residual, return_dz=False):
    """Per-channel (sum of dz, sum of dz * xhat), dz = dy * act'(z): the bias and weight gradients.

    With ``return_dz`` dz itself is also written and returned third, in dy's dtype: it is the residual's
    gradient, and ``backward_input(..., dz=dz)`` then reads it instead of dy and the residual.
    """
    dy, dy_strides, x, x_strides, residual, r_strides = _grad_operands(dy, x, residual, activation)
    plan = _plan_for(x, x_strides)
    R, C, S = _dims(x)
    # Every (split, channel) partial is written when there are rows; an empty batch sums to zero.
    new_partials = torch.empty if R > 0 else torch.zeros
    part_dz = new_partials((plan.num_splits, C), dtype=_stats_dtype(x), device=x.device)
    part_dz_xhat = torch.empty_like(part_dz) if R > 0 else torch.zeros_like(part_dz)
    dz_out = torch.empty_like(x, dtype=dy.dtype) if return_dz else None
    dz_strides = _ncs_strides(dz_out) if return_dz else (0, 0, 0)
    if R > 0:
        _backward_reduce_kernel[plan.grid](
            dy, x, residual if residual is not None else x, mean, rstd, *_param_args(weight, bias, mean),
            part_dz, part_dz_xhat, dz_out if dz_out is not None else x,
            R, C, S, *dy_strides, *x_strides, *r_strides, *dz_strides, plan.rows_per_split,
            *_split_float(negative_slope),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            STORE_DZ=dz_out is not None, ACTIVATION=_activation_id(activation),
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, ROWS_I64=plan.rows_i64, COMPUTE=_compute_dtype(x),
            num_warps=plan.num_warps)
    sum_dz = torch.empty(C, dtype=_stats_dtype(x), device=x.device)
    sum_dz_xhat = torch.empty_like(sum_dz)
    _sum_partials_kernel[plan.reduce_grid](
        part_dz, part_dz_xhat, sum_dz, sum_dz_xhat, C, plan.num_splits,
        BLOCK_C=plan.block_c, COMPUTE=_compute_dtype(x))
    return (sum_dz, sum_dz_xhat, dz_out) if return_dz else (sum_dz, sum_dz_xhat)


def backward_input(dy, x, mean, rstd, weight, bias, activation, negative_slope, residual,
                   sum_dz, sum_dz_xhat, count, training, need_dx=True, need_dresidual=None, dz=None):
    """Gradients of the input and of the residual (which is dz); returns (dx, dresidual).

    ``count`` is the number of values per channel the statistics were taken over (the global count for
    synchronized batch norm); with ``training=False`` the statistics are constants and the sums unused.
    ``dz`` is dz already written by ``backward_reduce``: it is read instead of dy and the residual, and
    returned as the residual's gradient.
    """
    if need_dresidual is None:
        need_dresidual = residual is not None
    training = training and need_dx  # the batch-statistics terms (and the sums) only enter dx
    dy, dy_strides, x, x_strides, residual, r_strides = _grad_operands(dy, x, residual, activation)
    plan = _plan_for(x, x_strides)
    R, C, S = _dims(x)
    dx = torch.empty_like(x) if need_dx else None
    store_dz = need_dresidual and dz is None
    if store_dz:
        dz = torch.empty_like(x, dtype=dy.dtype)
    dresidual = dz if need_dresidual else None
    if R == 0 or not (need_dx or store_dz):
        return dx, dresidual
    dx_strides = _ncs_strides(dx) if need_dx else (0, 0, 0)
    dz_strides = _ncs_strides(dz) if dz is not None else (0, 0, 0)
    _backward_input_kernel[plan.grid](
        dy, x, residual if residual is not None else x, mean, rstd, *_param_args(weight, bias, mean),
        sum_dz if training else mean, sum_dz_xhat if training else mean,
        dx if need_dx else x, dz if dz is not None else x, count,
        R, C, S, *dy_strides, *x_strides, *r_strides, *dx_strides, *dz_strides, plan.rows_per_split,
        *_split_float(negative_slope),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        TRAINING=training, STORE_DX=need_dx, STORE_DZ=store_dz, LOAD_DZ=dz is not None and not store_dz,
        ACTIVATION=_activation_id(activation), BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
        ROWS_I64=plan.rows_i64, COMPUTE=_compute_dtype(x), num_warps=plan.num_warps)
    return dx, dresidual
