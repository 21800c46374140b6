"""Backward kernels: per-channel gradient sums, then the input gradient, at most two launches.

``backward_reduce_kernel`` writes each split's sums of dz and dz * xhat per channel (dz = dy * act'(z), with
the pre-activation z recomputed from x in registers rather than saved). ``backward_input_kernel`` then adds
those partials itself, in split order, in every program, so no launch or atomic is spent on finalizing;
the programs of split 0 store the weight and bias gradients, in the parameters' dtype.

Traffic in passes over one activation tensor: read dy, x (sums), read dy, x + write dx (input) = 5. With a
residual and an activation, the sums pass also reads the residual and writes dz (the residual's gradient),
and the input pass reads dz instead of dy and the residual: 5 + 1 read + 1 write.
"""

import torch
import triton
import triton.language as tl

from .activations import IDENTITY, activation_backward
from .launch import Launcher
from .plan import dense, device_index, ncs_strides, output_layout, split_float
from .tiles import (
    BATCH,
    GIVEN,
    RUNNING,
    channel_block,
    channel_params,
    split_rows,
    sum_partials,
    tile_offsets,
)


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
def backward_reduce_kernel(
    dy_ptr,  # gradient of the output
    x_ptr,  # input saved from the forward
    residual_ptr,  # residual saved from the forward (read when HAS_RESIDUAL)
    stats_ptr,  # [2, C] mean then rstd (STATS == GIVEN)
    weight_ptr, bias_ptr,  # [C] affine parameters (read when HAS_WEIGHT / HAS_BIAS)
    running_mean_ptr, running_var_ptr,  # [C] the statistics an eval forward used (STATS == RUNNING)
    part_ptr,  # out: [2, num_splits, C] per-split sums of dz, then of dz * xhat
    dz_ptr,  # out when STORE_DZ: dz itself, which is the residual's gradient
    eps_hi, eps_lo,  # eps as a float32 head and tail (STATS == RUNNING)
    slope_hi, slope_lo,  # leaky_relu's negative slope as a float32 head and tail
    R, C, S,  # reduction rows (N * S), channels, spatial size
    dy_stride_n, dy_stride_c, dy_stride_s,  # strides of dy
    x_stride_n, x_stride_c, x_stride_s,  # strides of x
    r_stride_n, r_stride_c, r_stride_s,  # strides of the residual
    dz_stride_n, dz_stride_c, dz_stride_s,  # strides of dz
    rows_per_split,  # rows each program owns; a multiple of BLOCK_R
    STATS: tl.constexpr,  # GIVEN or RUNNING; see tiles.py
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_DZ: tl.constexpr,  # write dz, so the input-gradient pass reads it instead of dy and the residual
    ACTIVATION: tl.constexpr,  # activation id, see activations.py
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile shape
    ROWS_I64: tl.constexpr,  # row indices need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = channel_block(C, BLOCK_C)
    mean, rstd, scale, bias, negative_slope = channel_params(
        stats_ptr, running_mean_ptr, running_var_ptr, weight_ptr, bias_ptr, eps_hi, eps_lo, slope_hi, slope_lo, C,
        cols, col_mask, STATS, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    sum_dz = tl.zeros([BLOCK_C], dtype=COMPUTE)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=COMPUTE)
    row_start, row_end = split_rows(rows_per_split, R, ROWS_I64)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        dz, xhat = _pre_activation_grad(
            dy_ptr, x_ptr, residual_ptr,
            tile_offsets(rows, cols, S, dy_stride_n, dy_stride_c, dy_stride_s),
            tile_offsets(rows, cols, S, x_stride_n, x_stride_c, x_stride_s),
            tile_offsets(rows, cols, S, r_stride_n, r_stride_c, r_stride_s),
            mask, mean, rstd, scale, bias, negative_slope, HAS_RESIDUAL, ACTIVATION, COMPUTE)
        if STORE_DZ:
            dz_offsets = tile_offsets(rows, cols, S, dz_stride_n, dz_stride_c, dz_stride_s)
            tl.store(dz_ptr + dz_offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xhat += tl.sum(dz * xhat, axis=0)
    out = tl.program_id(1) * C + cols
    tl.store(part_ptr + out, sum_dz, mask=col_mask)
    tl.store(part_ptr + tl.num_programs(1) * C + out, sum_dz_xhat, mask=col_mask)


@triton.jit
def backward_input_kernel(
    dy_ptr,  # gradient of the output (read unless LOAD_DZ)
    x_ptr,  # input saved from the forward
    residual_ptr,  # residual saved from the forward (read when HAS_RESIDUAL and dz is not loaded)
    stats_ptr,  # [2, C] mean then rstd (STATS == GIVEN)
    weight_ptr, bias_ptr,  # [C] affine parameters (read when HAS_WEIGHT / HAS_BIAS)
    running_mean_ptr, running_var_ptr,  # [C] the statistics an eval forward used (STATS == RUNNING)
    sums_ptr,  # SUMS == BATCH: [2, num_sum_splits, C] partials of the reduce kernel; GIVEN: their [2, C] totals
    dx_ptr,  # out when STORE_DX: gradient of the input
    dz_ptr,  # dz = dy * act'(z), the residual's gradient: written when STORE_DZ, read when LOAD_DZ
    dweight_ptr, dbias_ptr,  # [C] out when STORE_DWEIGHT / STORE_DBIAS: sum of dz * xhat, sum of dz
    eps_hi, eps_lo,  # eps as a float32 head and tail (STATS == RUNNING)
    slope_hi, slope_lo,  # leaky_relu's negative slope as a float32 head and tail
    count,  # number of values each channel's statistics were taken over
    num_sum_splits,  # splits of the reduce kernel's partials (SUMS == BATCH)
    R, C, S,  # reduction rows (N * S), channels, spatial size
    dy_stride_n, dy_stride_c, dy_stride_s,  # strides of dy
    x_stride_n, x_stride_c, x_stride_s,  # strides of x
    r_stride_n, r_stride_c, r_stride_s,  # strides of the residual
    dx_stride_n, dx_stride_c, dx_stride_s,  # strides of dx
    dz_stride_n, dz_stride_c, dz_stride_s,  # strides of dz
    rows_per_split,  # rows each program owns; a multiple of BLOCK_R
    STATS: tl.constexpr,  # GIVEN or RUNNING; see tiles.py
    SUMS: tl.constexpr,  # BATCH (add the partials) or GIVEN (totals over a process group); see tiles.py
    TRAINING: tl.constexpr,  # statistics came from the batch, so dx has the mean/variance terms
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DZ: tl.constexpr, LOAD_DZ: tl.constexpr,
    STORE_DWEIGHT: tl.constexpr, STORE_DBIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # activation id, see activations.py
    SPLIT_BLOCK: tl.constexpr,  # partial splits added per step
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile shape
    ROWS_I64: tl.constexpr,  # row indices need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = channel_block(C, BLOCK_C)
    mean, rstd, scale, bias, negative_slope = channel_params(
        stats_ptr, running_mean_ptr, running_var_ptr, weight_ptr, bias_ptr, eps_hi, eps_lo, slope_hi, slope_lo, C,
        cols, col_mask, STATS, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    mean_dz = tl.zeros_like(mean)
    mean_dz_xhat = tl.zeros_like(mean)
    if TRAINING or (STORE_DWEIGHT or STORE_DBIAS):
        if SUMS == BATCH:
            sum_dz, sum_dz_xhat = sum_partials(sums_ptr, C, cols, col_mask, num_sum_splits, SPLIT_BLOCK, BLOCK_C,
                                               COMPUTE)
        else:
            sum_dz = tl.load(sums_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
            sum_dz_xhat = tl.load(sums_ptr + C + cols, mask=col_mask, other=0.0).to(COMPUTE)
        if tl.program_id(1) == 0:
            if STORE_DWEIGHT:
                tl.store(dweight_ptr + cols, sum_dz_xhat.to(dweight_ptr.dtype.element_ty), mask=col_mask)
            if STORE_DBIAS:
                tl.store(dbias_ptr + cols, sum_dz.to(dbias_ptr.dtype.element_ty), mask=col_mask)
        # Promote through a COMPUTE tensor: the int may arrive as a constexpr (Triton specialises 1).
        inv_count = 1.0 / (tl.zeros_like(mean) + count)
        mean_dz = sum_dz * inv_count
        mean_dz_xhat = sum_dz_xhat * inv_count
    if STORE_DX or STORE_DZ:
        row_start, row_end = split_rows(rows_per_split, R, ROWS_I64)
        for start in range(row_start, row_end, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            x_offsets = tile_offsets(rows, cols, S, x_stride_n, x_stride_c, x_stride_s)
            dz_offsets = tile_offsets(rows, cols, S, dz_stride_n, dz_stride_c, dz_stride_s)
            if LOAD_DZ:
                dz = tl.load(dz_ptr + dz_offsets, mask=mask, other=0.0).to(COMPUTE)
                x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(COMPUTE)
                xhat = (x - mean[None, :]) * rstd[None, :]
            else:
                dz, xhat = _pre_activation_grad(
                    dy_ptr, x_ptr, residual_ptr,
                    tile_offsets(rows, cols, S, dy_stride_n, dy_stride_c, dy_stride_s), x_offsets,
                    tile_offsets(rows, cols, S, r_stride_n, r_stride_c, r_stride_s),
                    mask, mean, rstd, scale, bias, negative_slope, HAS_RESIDUAL, ACTIVATION, COMPUTE)
            if STORE_DZ:
                tl.store(dz_ptr + dz_offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            if STORE_DX:
                if TRAINING:
                    dx = (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]) * scale[None, :]
                else:
                    dx = dz * scale[None, :]
                dx_offsets = tile_offsets(rows, cols, S, dx_stride_n, dx_stride_c, dx_stride_s)
                tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Plan and launcher
# --------------------------------------------------------------------------------------------------


class BackwardPlan:
    """A backward call's layouts, buffers and launchers, made once per forward plan, gradient layout and
    set of gradients wanted: (input, weight, bias, residual)."""

    def __init__(self, forward, dy, weight, bias, residual, needs):
        need_input, need_weight, need_bias, need_residual = needs
        shape = forward.shape
        tiling = forward.tiling
        identity = forward.activation_id == IDENTITY.value
        self.forward = forward
        self.copy_params = forward.copy_params or not forward.dense_running
        self.copy_dy = ncs_strides(shape, dy.stride()) is None
        dy_ncs = ncs_strides(shape, forward.out_stride if self.copy_dy else dy.stride())
        x_ncs = forward.x_ncs
        # The residual is only read to recompute z, which the identity does not need.
        has_residual = residual is not None and not identity
        r_ncs = ncs_strides(shape, forward.out_stride if forward.copy_residual else residual.stride()) \
            if has_residual else (0, 0, 0)
        self.dx_stride = output_layout(shape, forward.out_stride)[0]
        self.dz_dtype = dy.dtype
        # The residual's gradient is dz = dy * act'(z): dy itself for the identity, else written by the first
        # pass that computes dz and read back by the second instead of recomputed.
        self.dresidual_is_dy = need_residual and identity
        need_dz = need_residual and not identity
        self.run_reduce = need_weight or need_bias or (forward.training and need_input)
        store_dz_in_reduce = need_dz and self.run_reduce
        self.run_input = need_input or need_weight or need_bias or (need_dz and not self.run_reduce)
        self.need_input, self.need_weight, self.need_bias, self.need_dz = need_input, need_weight, need_bias, need_dz
        self.weight_dtype = None if weight is None else weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.workspace_numel = 2 * tiling.num_splits * forward.C
        self.stats_dtype = forward.stats_dtype
        index = device_index(dy.device)
        stats = (GIVEN if forward.training else RUNNING).value
        common = (forward.R, forward.C, forward.S, *dy_ncs, *x_ncs, *r_ncs)
        flags = (weight is not None, bias is not None, has_residual)
        tile = (tiling.block_r, tiling.block_c, tiling.rows_i64, forward.compute)
        self.reduce = Launcher(backward_reduce_kernel, tiling.grid, tiling.num_warps, 10, index)
        grad_ncs = ncs_strides(shape, self.dx_stride)  # dx's and dz's: both are allocated in that layout
        self.reduce_tail = (*common, *grad_ncs, tiling.rows_per_split, stats, *flags,
                            store_dz_in_reduce, forward.activation_id, *tile)
        # Without dx or dz to write, the input kernel only totals the weight and bias gradients: one split.
        rows_pass = need_input or (need_dz and not self.run_reduce)
        grid = tiling.grid if rows_pass else (tiling.channel_blocks, 1)
        self.input = Launcher(backward_input_kernel, grid, tiling.num_warps, 13, index)
        self.input_tail = (
            forward.count, tiling.num_splits, *common,
            *grad_ncs, *grad_ncs, tiling.rows_per_split, stats, BATCH.value,
            forward.training, *flags, need_input, need_dz and not self.run_reduce, store_dz_in_reduce,
            need_weight, need_bias, forward.activation_id, tiling.split_block, *tile)

    def __call__(self, dy, x, stats, weight, bias, residual, running_mean, running_var, eps, negative_slope):
        """(grad input, grad weight, grad bias, grad residual), None for those not wanted."""
        if self.copy_dy:
            dy = dy.contiguous()
        if self.forward.copy_input:
            x = x.contiguous()
        if residual is not None and self.forward.copy_residual:
            residual = residual.contiguous()
        if self.copy_params:
            weight, bias, running_mean, running_var = map(dense, (weight, bias, running_mean, running_var))
        device = dy.device
        dx = torch.empty_strided(self.forward.shape, self.dx_stride, dtype=x.dtype, device=device) \
            if self.need_input else None
        dz = torch.empty_strided(self.forward.shape, self.dx_stride, dtype=self.dz_dtype, device=device) \
            if self.need_dz else None
        dweight = torch.empty(self.forward.C, dtype=self.weight_dtype, device=device) if self.need_weight else None
        dbias = torch.empty(self.forward.C, dtype=self.bias_dtype, device=device) if self.need_bias else None
        dresidual = dy if self.dresidual_is_dy else dz
        if self.forward.empty:
            for grad in (dweight, dbias):
                if grad is not None:
                    grad.zero_()
            return dx, dweight, dbias, dresidual
        sums = None
        tensors = (dy, x, x if residual is None else residual, x if stats is None else stats,
                   x if weight is None else weight, x if bias is None else bias,
                   x if running_mean is None else running_mean, x if running_var is None else running_var)
        floats = (*split_float(eps), *split_float(negative_slope))
        if self.run_reduce:
            sums = torch.empty(self.workspace_numel, dtype=self.stats_dtype, device=device)
            self.reduce(*tensors, sums, x if dz is None else dz, *floats, *self.reduce_tail)
        if self.run_input:
            self.input(*tensors, x if sums is None else sums, x if dx is None else dx, x if dz is None else dz,
                       x if dweight is None else dweight, x if dbias is None else dbias, *floats, *self.input_tail)
        return dx, dweight, dbias, dresidual


def backward_plan(forward, dy, weight, bias, residual, needs) -> BackwardPlan:
    """The cached plan for the backward of a call planned by ``forward``."""
    key = (dy.stride(), dy.dtype, needs)
    plan = forward.backward_plans.get(key)
    if plan is None:
        plan = forward.backward_plans[key] = BackwardPlan(forward, dy, weight, bias, residual, needs)
    return plan
