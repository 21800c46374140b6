"""Jit helpers shared by the forward and backward kernels: tile addressing, scalars, partial merges.

Every tensor is addressed as a 3-D view (N, C, S), S being all spatial dims collapsed, through its own
three strides. A program owns BLOCK_C channels (axis 0 of the grid) and a contiguous slice, a "split", of
the N*S reduction rows (axis 1), which it walks in BLOCK_R-row tiles.
"""

import triton
import triton.language as tl

# Where a kernel's per-channel statistics come from (the STATS constexpr).
BATCH = tl.constexpr(0)  # merged from this call's partials (training)
GIVEN = tl.constexpr(1)  # read from a [2, C] buffer of mean and rstd (backward, synchronized batch norm)
RUNNING = tl.constexpr(2)  # folded from the running statistics (eval)


@triton.jit
def tile_offsets(rows, cols, S, stride_n, stride_c, stride_s):
    """Element offsets of a [BLOCK_R, BLOCK_C] tile; row r is sample r // S, spatial position r % S."""
    n = rows // S
    s = rows - n * S
    row_offsets = n.to(tl.int64) * stride_n + s.to(tl.int64) * stride_s
    return row_offsets[:, None] + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def channel_block(C, BLOCK_C: tl.constexpr):
    """This program's channels and which of them exist."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def split_rows(rows_per_split, R, ROWS_I64: tl.constexpr):
    """First and end row of this program's split; int64 only when rows pass int32's range (rare, and
    int64 index arithmetic is slower)."""
    pid_split = tl.program_id(1)
    if ROWS_I64:
        pid_split = pid_split.to(tl.int64)
    row_start = pid_split * rows_per_split
    return row_start, tl.minimum(row_start + rows_per_split, R)


@triton.jit
def scalar(hi, lo, like):
    """A float argument, passed as a float32 head and tail (about 48 bits: a few float64 ulps, where a
    single float32 would lose 29 bits), as a tensor shaped and typed like ``like``."""
    return (tl.zeros_like(like) + hi) + lo


@triton.jit
def merge_moments(part_ptr, C, cols, col_mask, num_splits, rows_per_split, last_split_rows,
                  SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr):
    """(count, mean, M2) of the channels ``cols`` from the per-split partials written by
    ``moments_partial_kernel`` at ``part_ptr`` (means, then M2s, each [num_splits, C]).

    The parallel-variance merge, M2 = sum of (M2_i + n_i (mean_i - mean)^2), in one pass of
    [SPLIT_BLOCK, BLOCK_C] tiles, with the deviations taken from split 0's mean (exact for large means, as
    every split's mean is close to it). Every program merges the same way, so all get bitwise the same
    statistics: no atomics, no finalizing launch.
    """
    shift = tl.load(part_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    sum_dev = tl.zeros([BLOCK_C], dtype=COMPUTE)  # sum of n_i (mean_i - shift)
    sum_sq = tl.zeros([BLOCK_C], dtype=COMPUTE)  # sum of M2_i + n_i (mean_i - shift)^2
    for first in range(0, num_splits, SPLIT_BLOCK):
        splits = first + tl.arange(0, SPLIT_BLOCK)
        split_mask = splits < num_splits
        counts = tl.where(splits == num_splits - 1, last_split_rows, rows_per_split).to(COMPUTE)
        counts = tl.where(split_mask, counts, 0.0)
        offsets = splits[:, None] * C + cols[None, :]
        mask = split_mask[:, None] & col_mask[None, :]
        means = tl.load(part_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        m2s = tl.load(part_ptr + num_splits * C + offsets, mask=mask, other=0.0).to(COMPUTE)
        deviation = tl.where(mask, means - shift[None, :], 0.0)
        sum_dev += tl.sum(counts[:, None] * deviation, axis=0)
        sum_sq += tl.sum(m2s + counts[:, None] * deviation * deviation, axis=0)
    count = (tl.zeros([BLOCK_C], dtype=COMPUTE) + (num_splits - 1)) * rows_per_split + last_split_rows
    offset = sum_dev / count
    return count, shift + offset, sum_sq - sum_dev * offset


@triton.jit
def sum_partials(part_ptr, C, cols, col_mask, num_splits, SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                 COMPUTE: tl.constexpr):
    """Totals of two per-channel quantities from [2, num_splits, C] partials, in [SPLIT_BLOCK, BLOCK_C]
    tiles, the same way in every program."""
    sum_a = tl.zeros([BLOCK_C], dtype=COMPUTE)
    sum_b = tl.zeros([BLOCK_C], dtype=COMPUTE)
    for first in range(0, num_splits, SPLIT_BLOCK):
        splits = first + tl.arange(0, SPLIT_BLOCK)
        offsets = splits[:, None] * C + cols[None, :]
        mask = (splits < num_splits)[:, None] & col_mask[None, :]
        sum_a += tl.sum(tl.load(part_ptr + offsets, mask=mask, other=0.0).to(COMPUTE), axis=0)
        sum_b += tl.sum(tl.load(part_ptr + num_splits * C + offsets, mask=mask, other=0.0).to(COMPUTE), axis=0)
    return sum_a, sum_b


@triton.jit
def channel_stats(stats_ptr, running_mean_ptr, running_var_ptr, eps_hi, eps_lo, C, cols, col_mask,
                  STATS: tl.constexpr, COMPUTE: tl.constexpr):
    """Per-channel (mean, rstd) of a tile's channels, read from ``stats_ptr`` (mean, then rstd: STATS ==
    GIVEN) or folded from the running statistics (STATS == RUNNING: eval mode)."""
    if STATS == RUNNING:
        mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
        var = tl.load(running_var_ptr + cols, mask=col_mask, other=1.0).to(COMPUTE)
        rstd = 1.0 / tl.sqrt(var + scalar(eps_hi, eps_lo, var))
    else:
        mean = tl.load(stats_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
        rstd = tl.load(stats_ptr + C + cols, mask=col_mask, other=0.0).to(COMPUTE)
    return mean, rstd


@triton.jit
def affine(rstd, weight_ptr, bias_ptr, cols, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
           COMPUTE: tl.constexpr):
    """(scale = weight * rstd, bias) of a tile's channels; weight 1 and bias 0 where absent."""
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    bias = tl.zeros_like(rstd)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    return scale, bias


@triton.jit
def channel_params(stats_ptr, running_mean_ptr, running_var_ptr, weight_ptr, bias_ptr, eps_hi, eps_lo, slope_hi,
                   slope_lo, C, cols, col_mask, STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    """(mean, rstd, scale, bias, negative_slope) of a tile's channels, from given or running statistics."""
    mean, rstd = channel_stats(stats_ptr, running_mean_ptr, running_var_ptr, eps_hi, eps_lo, C, cols, col_mask,
                               STATS, COMPUTE)
    scale, bias = affine(rstd, weight_ptr, bias_ptr, cols, col_mask, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    return mean, rstd, scale, bias, scalar(slope_hi, slope_lo, mean)
