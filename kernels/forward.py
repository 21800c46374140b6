"""Forward kernels: batch moments, then normalise + residual add + activation, at most two launches.

Training: ``moments_partial_kernel`` writes each split's (mean, M2) per channel; ``normalize_kernel`` then
merges those partials itself, in split order, in every program (a few KB read from L2 per program), so no
third "finalize" launch, atomic or ticket is needed and the result is bitwise reproducible. The programs of
split 0 store the merged mean and rstd for backward and update the running statistics.
Eval: ``normalize_kernel`` alone, with the running statistics folded into scale and shift per channel.

Traffic in passes over one activation tensor (the residual adds its own read):
  training: read x (moments), read x + write y (normalise)   = 3
  eval:     read x + write y                                  = 2
"""

import torch
import triton
import triton.language as tl

from ..reference import output_dtype
from .activations import activation_forward
from .launch import Launcher
from .plan import (
    Tiling,
    compute_dtype,
    dense,
    device_index,
    ncs_strides,
    output_layout,
    spatial_size,
    split_float,
    stats_dtype,
)
from .tiles import BATCH, RUNNING, affine, channel_block, channel_stats, merge_moments, scalar, split_rows, tile_offsets


@triton.jit
def moments_partial_kernel(
    x_ptr,  # input, addressed as (N, C, S) through the three strides below
    workspace_ptr,  # [2, C] statistics (normalize_kernel's), then out: [2, num_splits, C] per-split mean, M2
    R, C, S,  # reduction rows (N * S), channels, spatial size (product of the dims after C; 1 for 2-D input)
    stride_n, stride_c, stride_s,  # strides of x
    rows_per_split,  # rows each split owns; a multiple of BLOCK_R
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile shape
    ROWS_I64: tl.constexpr,  # row indices need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = channel_block(C, BLOCK_C)
    row_start, row_end = split_rows(rows_per_split, R, ROWS_I64)
    count = tl.zeros([BLOCK_C], dtype=COMPUTE)
    mean = tl.zeros([BLOCK_C], dtype=COMPUTE)
    m2 = tl.zeros([BLOCK_C], dtype=COMPUTE)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + tile_offsets(rows, cols, S, stride_n, stride_c, stride_s), mask=mask, other=0.0)
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
    partials_ptr = workspace_ptr + 2 * C
    out = tl.program_id(1) * C + cols
    tl.store(partials_ptr + out, mean, mask=col_mask)
    tl.store(partials_ptr + tl.num_programs(1) * C + out, m2, mask=col_mask)


@triton.jit
def normalize_kernel(
    x_ptr,  # input
    y_ptr,  # out: act((x - mean) * rstd * weight + bias [+ residual]), in the output dtype
    residual_ptr,  # residual added before the activation (read when HAS_RESIDUAL)
    stats_ptr,  # the workspace: out [2, C] mean and rstd, then the moments' partials (STATS == BATCH)
    weight_ptr, bias_ptr,  # [C] affine parameters (read when HAS_WEIGHT / HAS_BIAS)
    running_mean_ptr, running_var_ptr,  # [C] folded in eval (STATS == RUNNING), updated when UPDATE_RUNNING
    eps_hi, eps_lo,  # eps as a float32 head and tail
    momentum_hi, momentum_lo,  # running-average factor as a float32 head and tail
    slope_hi, slope_lo,  # leaky_relu's negative slope as a float32 head and tail
    R, C, S,  # reduction rows (N * S), channels, spatial size
    x_stride_n, x_stride_c, x_stride_s,  # strides of x
    y_stride_n, y_stride_c, y_stride_s,  # strides of y
    r_stride_n, r_stride_c, r_stride_s,  # strides of the residual
    rows_per_split,  # rows each program owns; a multiple of BLOCK_R
    num_moment_splits,  # splits of the moments' partials (STATS == BATCH)
    moment_rows_per_split,  # rows each of those splits owned
    last_moment_split_rows,  # rows the last of them owned
    STATS: tl.constexpr,  # BATCH (merge the partials) or RUNNING (eval); see tiles.py
    UPDATE_RUNNING: tl.constexpr,  # fold the batch statistics into the running ones (program split 0)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # activation id, see activations.py
    SPLIT_BLOCK: tl.constexpr,  # partial splits merged per step
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile shape
    ROWS_I64: tl.constexpr,  # row indices need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = channel_block(C, BLOCK_C)
    if STATS == BATCH:
        count, mean, m2 = merge_moments(stats_ptr + 2 * C, C, cols, col_mask, num_moment_splits, moment_rows_per_split,
                                        last_moment_split_rows, SPLIT_BLOCK, BLOCK_C, COMPUTE)
        rstd = 1.0 / tl.sqrt(m2 / count + scalar(eps_hi, eps_lo, mean))
        if tl.program_id(1) == 0:
            tl.store(stats_ptr + cols, mean, mask=col_mask)
            tl.store(stats_ptr + C + cols, rstd, mask=col_mask)
            if UPDATE_RUNNING:
                momentum = scalar(momentum_hi, momentum_lo, mean)
                running_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
                running_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
                running_mean += momentum * (mean - running_mean)
                running_var += momentum * (m2 / (count - 1.0) - running_var)  # unbiased, as PyTorch
                tl.store(running_mean_ptr + cols, running_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
                tl.store(running_var_ptr + cols, running_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)
    else:
        mean, rstd = channel_stats(stats_ptr, running_mean_ptr, running_var_ptr, eps_hi, eps_lo, C, cols, col_mask,
                                   STATS, COMPUTE)
    scale, bias = affine(rstd, weight_ptr, bias_ptr, cols, col_mask, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    negative_slope = scalar(slope_hi, slope_lo, mean)
    row_start, row_end = split_rows(rows_per_split, R, ROWS_I64)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + tile_offsets(rows, cols, S, x_stride_n, x_stride_c, x_stride_s),
                    mask=mask, other=0.0).to(COMPUTE)
        # (x - mean) first: folding mean into the shift would cancel catastrophically for large means.
        z = (x - mean[None, :]) * scale[None, :] + bias[None, :]
        if HAS_RESIDUAL:
            r_offsets = tile_offsets(rows, cols, S, r_stride_n, r_stride_c, r_stride_s)
            z += tl.load(residual_ptr + r_offsets, mask=mask, other=0.0).to(COMPUTE)
        y = activation_forward(z, negative_slope, ACTIVATION)
        y_offsets = tile_offsets(rows, cols, S, y_stride_n, y_stride_c, y_stride_s)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Plan and launcher
# --------------------------------------------------------------------------------------------------


class ForwardPlan:
    """Everything a forward call needs that depends only on its tensors' shapes, strides and dtypes and
    on its options: the layouts, the tiling, the buffers to allocate and the two launchers.

    Backward plans for the same forward hang off it (``backward_plans``), so backward finds its own with one
    dictionary look-up.
    """

    def __init__(self, x, weight, bias, residual, running_mean, training, activation_id):
        shape, stride = tuple(x.shape), x.stride()
        self.out_dtype = output_dtype(x, residual)
        self.out_stride, self.copy_input = output_layout(shape, stride)
        x_stride = self.out_stride if self.copy_input else stride
        self.shape = shape
        self.x_ncs = ncs_strides(shape, x_stride)
        self.copy_residual = residual is not None and ncs_strides(shape, residual.stride()) is None
        r_ncs = (0, 0, 0)
        if residual is not None:
            r_ncs = ncs_strides(shape, self.out_stride if self.copy_residual else residual.stride())
        self.R, self.C, self.S = shape[0] * spatial_size(shape), shape[1], spatial_size(shape)
        self.count = self.R  # values per channel the statistics are taken over
        self.empty = self.R == 0 or self.C == 0
        self.stats_dtype = stats_dtype(x.dtype)
        self.compute = compute_dtype(x.dtype)
        self.training = training
        self.update_running = training and running_mean is not None
        self.dense_running = running_mean is None or running_mean.stride() == (1,)
        # The kernels index per-channel tensors as dense vectors; a strided one (a view) is copied per call.
        self.copy_params = any(t is not None and t.stride() != (1,) for t in (weight, bias))
        self.tiling = tiling = Tiling(self.R, self.C, self.x_ncs[1] == 1, x.device, x.element_size(),
                                      torch.finfo(self.stats_dtype).bits // 8)
        self.workspace_numel = 2 * self.C + 2 * tiling.num_splits * self.C  # mean and rstd, then the partials
        self.activation_id = activation_id
        self.backward_plans = {}
        index = device_index(x.device)
        tile = (tiling.block_r, tiling.block_c, tiling.rows_i64, self.compute)
        self.moments = Launcher(moments_partial_kernel, tiling.grid, tiling.num_warps, 2, index)
        self.moments_tail = (self.R, self.C, self.S, *self.x_ncs, tiling.rows_per_split, *tile)
        self.normalize = Launcher(normalize_kernel, tiling.grid, tiling.num_warps, 8, index)
        self.normalize_tail = (
            self.R, self.C, self.S, *self.x_ncs, *ncs_strides(shape, self.out_stride), *r_ncs,
            tiling.rows_per_split, tiling.num_splits, tiling.rows_per_split, tiling.last_split_rows,
            (BATCH if training else RUNNING).value, self.update_running, weight is not None, bias is not None,
            residual is not None, activation_id, tiling.split_block, *tile)

    def __call__(self, x, weight, bias, residual, running_mean, running_var, momentum, eps, negative_slope):
        """(y, the workspace that begins with the batch's mean and rstd; None in eval)."""
        if self.copy_input:
            x = x.contiguous()
        if self.copy_residual:
            residual = residual.contiguous()
        if self.copy_params:
            weight, bias = dense(weight), dense(bias)
        y = torch.empty_strided(self.shape, self.out_stride, dtype=self.out_dtype, device=x.device)
        workspace = None
        if self.training:
            workspace = torch.empty(self.workspace_numel, dtype=self.stats_dtype, device=x.device)
        if self.empty:
            return y, workspace
        if self.training:
            self.moments(x, workspace, *self.moments_tail)
        if not self.dense_running:  # the kernel updates dense copies of strided running statistics
            targets = running_mean, running_var
            running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
        self.normalize(
            x, y, x if residual is None else residual, x if workspace is None else workspace,
            x if weight is None else weight, x if bias is None else bias,
            x if running_mean is None else running_mean, x if running_var is None else running_var,
            *split_float(eps), *split_float(momentum), *split_float(negative_slope), *self.normalize_tail)
        if not self.dense_running and self.update_running:
            for target, updated in zip(targets, (running_mean, running_var)):
                target.copy_(updated)
        return y, workspace

