"""The backward kernel family: per-channel gradient sums, then the input gradient.

One jit function, ``backward_kernel``; its PHASE constexpr says what a launch does (tiles.py):
- PARTIALS / TICKET: each program sums dz and dz * (x - mean) per channel over its split (dz = dy * act'(z),
  the pre-activation z recomputed from x in registers rather than saved) and writes them; with TICKET the
  last program of each channel block totals them once, stores the totals and the weight and bias gradients.
- APPLY: dx = (dz - mean(dz) - xhat * mean(dz * xhat)) * weight * rstd (training; dz * weight * rstd in eval),
  with the sums GIVEN (the ticket's totals, or SyncBN's over the group) or MERGEd by each program itself.
SyncBatchNormAct's launches take the group's statistics and value count GATHERED: each program merges them
from the ranks' moments the forward gathered (tiles.gathered_stats), as the forward did.
- PERSISTENT: both in one launch, dy and x kept in registers across a grid-wide barrier.

Traffic in passes over one activation tensor: read dy, x (sums), read dy, x + write dx (input) = 5; the
persistent variant reads each once: 3. With a residual and an activation the sums pass also reads the
residual and writes dz (the residual's gradient), which the input pass reads instead of dy and the
residual: 5 + 1 read + 1 write. The workspace holds the [2, C] totals, then the [2, splits, C] partials.
"""

import torch
import triton
import triton.language as tl

from .activations import IDENTITY, activation_backward
from .configs import choose
from .launch import Launcher, call_state, launch_all, stream_free_counters
from .plan import (
    LAYOUT_NAMES,
    Tiling,
    dense_vectors,
    float_args,
    kernel_strides,
    layout_family,
    ncs_strides,
    needs_int64,
    operand_layout,
    output_layout,
)
from .tiles import (
    APPLY,
    GATHERED,
    GIVEN,
    MERGE,
    PARTIALS,
    PERSISTENT,
    RUNNING,
    TICKET,
    affine,
    channel_block,
    channel_stats,
    gathered_stats,
    grid_barrier,
    scalar,
    split_tiles,
    store_partials,
    sum_partials,
    take_ticket,
    tile_offsets,
    tile_rows,
)


@triton.jit
def _grad_tile(dy_ptr, x_ptr, residual_ptr, t, mean, scale, bias, negative_slope, R, N, S, s_tiles, cols, col_mask,
               dy_sa, dy_sc, dy_sb, x_sa, x_sc, x_sb, r_sa, r_sc, r_sb, HAS_RESIDUAL: tl.constexpr,
               ACTIVATION: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
               INDEX_I64: tl.constexpr, COMPUTE: tl.constexpr):
    """(dz, x - mean, mask) of tile ``t``: dz = dy * act'(z), z recomputed from x and the channel statistics;
    both 0 where the mask is off."""
    a, b, row_mask = tile_rows(t, R, N, S, s_tiles, LAYOUT, BLOCK_R, BLOCK_S)
    mask = row_mask[:, None] & col_mask[None, :]
    dy = tl.load(dy_ptr + tile_offsets(a, b, cols, S, dy_sa, dy_sc, dy_sb, LAYOUT, INDEX_I64), mask=mask,
                 other=0.0).to(COMPUTE)
    x = tl.load(x_ptr + tile_offsets(a, b, cols, S, x_sa, x_sc, x_sb, LAYOUT, INDEX_I64), mask=mask,
                other=0.0).to(COMPUTE)
    centered = tl.where(mask, x - mean[None, :], 0.0)
    dz = dy
    if ACTIVATION != IDENTITY:
        z = centered * scale[None, :] + bias[None, :]
        if HAS_RESIDUAL:
            z += tl.load(residual_ptr + tile_offsets(a, b, cols, S, r_sa, r_sc, r_sb, LAYOUT, INDEX_I64), mask=mask,
                         other=0.0).to(COMPUTE)
        dz = activation_backward(dy, z, negative_slope, ACTIVATION)
    return dz, centered, mask


@triton.jit
def _store_tile(ptr, value, t, R, N, S, s_tiles, cols, mask, sa, sc, sb, LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_S: tl.constexpr, INDEX_I64: tl.constexpr):
    a, b, _ = tile_rows(t, R, N, S, s_tiles, LAYOUT, BLOCK_R, BLOCK_S)
    tl.store(ptr + tile_offsets(a, b, cols, S, sa, sc, sb, LAYOUT, INDEX_I64), value.to(ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _finish_sums(sums_ptr, dweight_ptr, dbias_ptr, sum_dz, sum_dz_xhat, cols, col_mask, C, store,
                 STORE_TOTALS: tl.constexpr, STORE_DWEIGHT: tl.constexpr, STORE_DBIAS: tl.constexpr):
    """Where ``store`` holds: the totals (for the input pass) and the weight and bias gradients."""
    if store:
        if STORE_TOTALS:
            tl.store(sums_ptr + cols, sum_dz, mask=col_mask)
            tl.store(sums_ptr + C + cols, sum_dz_xhat, mask=col_mask)
        if STORE_DWEIGHT:
            tl.store(dweight_ptr + cols, sum_dz_xhat.to(dweight_ptr.dtype.element_ty), mask=col_mask)
        if STORE_DBIAS:
            tl.store(dbias_ptr + cols, sum_dz.to(dbias_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _input_grad(dz, centered, rstd, scale, mean_dz, mean_dz_xhat, TRAINING: tl.constexpr):
    if TRAINING:  # the batch statistics depend on x: their gradient comes back through every value
        xhat = centered * rstd[None, :]
        return (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]) * scale[None, :]
    return dz * scale[None, :]


@triton.jit
def backward_kernel(
    dy_ptr,  # gradient of the output (read unless LOAD_DZ)
    x_ptr,  # input saved from the forward
    residual_ptr,  # residual saved from the forward (read to recompute z when HAS_RESIDUAL)
    stats_ptr,  # [2, C] mean then rstd (STATS == GIVEN), or the ranks' [ranks, 4, C] moments (GATHERED)
    weight_ptr, bias_ptr,  # [C] affine parameters (read when HAS_WEIGHT / HAS_BIAS)
    running_mean_ptr, running_var_ptr,  # [C] the statistics an eval forward used (STATS == RUNNING)
    sums_ptr,  # [2, C] totals of dz and dz * xhat (out of TICKET, in when SUMS == GIVEN), then the partials
    counters_ptr,  # int32 ticket counters and grid barrier (tiles.py), zero at rest
    dz_ptr,  # dz = dy * act'(z), the residual's gradient: written when STORE_DZ, read when LOAD_DZ
    dx_ptr,  # out when STORE_DX: gradient of the input
    dweight_ptr, dbias_ptr,  # [C] out when STORE_DWEIGHT / STORE_DBIAS: sum of dz * xhat, sum of dz
    eps_hi, eps_lo,  # eps as a float32 head and tail (STATS == RUNNING or GATHERED)
    slope_hi, slope_lo,  # leaky_relu's negative slope as a float32 head and tail
    sums_offset,  # elements from sums_ptr to the sums: 2 * C where they follow the forward's mean and rstd
    count,  # number of values each channel's statistics were taken over (GATHERED: merged, this unused)
    R, N, C, S,  # rows (N * S), samples, channels, spatial size
    s_tiles, num_tiles, tiles_per_split,  # PLANES: tiles per sample run; tiles in all; tiles per split
    num_partials,  # splits of the partials being added (SUMS == MERGE), or ranks (STATS == GATHERED)
    dy_sa, dy_sc, dy_sb,  # strides of dy (plan.kernel_strides)
    x_sa, x_sc, x_sb,  # strides of x
    r_sa, r_sc, r_sb,  # strides of the residual
    dz_sa, dz_sc, dz_sb,  # strides of dz
    dx_sa, dx_sc, dx_sb,  # strides of dx
    w_s, b_s, rm_s, rv_s,  # element strides of weight, bias, running_mean and running_var
    PHASE: tl.constexpr,  # PARTIALS, TICKET, APPLY or PERSISTENT (tiles.py)
    STATS: tl.constexpr,  # GIVEN (training), RUNNING (eval) or GATHERED (SyncBatchNormAct)
    SUMS: tl.constexpr,  # APPLY in training: GIVEN (totals at sums_ptr) or MERGE (add the partials here)
    TRAINING: tl.constexpr,  # the statistics came from the batch, so dx has the mean/variance terms
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_DZ: tl.constexpr, LOAD_DZ: tl.constexpr, STORE_DX: tl.constexpr,
    STORE_DWEIGHT: tl.constexpr, STORE_DBIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # activation id, see activations.py
    LAYOUT: tl.constexpr,  # ROWS, PLANES or STRIDED (plan.py)
    SPLIT_BLOCK: tl.constexpr,  # partial splits added per step
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile: rows, channels, PLANES run
    INDEX_I64: tl.constexpr,  # offsets need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = channel_block(C, BLOCK_C)
    sums_ptr += sums_offset
    if STATS == GATHERED:  # the group's statistics and value count, merged exactly as the forward merged them
        count, mean, _, rstd = gathered_stats(stats_ptr, eps_hi, eps_lo, C, cols, col_mask, num_partials, BLOCK_C,
                                              COMPUTE)
    else:
        mean, rstd = channel_stats(stats_ptr, running_mean_ptr, running_var_ptr, rm_s, rv_s, eps_hi, eps_lo, C, cols,
                                   col_mask, STATS, COMPUTE)
    scale, bias = affine(rstd, weight_ptr, bias_ptr, w_s, b_s, cols, col_mask, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    negative_slope = scalar(slope_hi, slope_lo, mean)
    num_splits = tl.num_programs(1)
    first, end = split_tiles(num_tiles, tiles_per_split)
    if PHASE != APPLY:
        dz, centered, mask = _grad_tile(dy_ptr, x_ptr, residual_ptr, first, mean, scale, bias, negative_slope, R, N, S,
                                        s_tiles, cols, col_mask, dy_sa, dy_sc, dy_sb, x_sa, x_sc, x_sb, r_sa, r_sc,
                                        r_sb, HAS_RESIDUAL, ACTIVATION, LAYOUT, BLOCK_R, BLOCK_S, INDEX_I64, COMPUTE)
        if STORE_DZ:
            _store_tile(dz_ptr, dz, first, R, N, S, s_tiles, cols, mask, dz_sa, dz_sc, dz_sb, LAYOUT, BLOCK_R, BLOCK_S,
                        INDEX_I64)
        # Per-lane sums (FMA only), reduced across the tile once at the end. The first tile's dz, x - mean and
        # mask stay in registers: the persistent variant's one tile.
        sum_dz = dz
        sum_dz_centered = dz * centered
        t = first + 1
        while t < end:
            dz_t, centered_t, mask_t = _grad_tile(dy_ptr, x_ptr, residual_ptr, t, mean, scale, bias, negative_slope, R,
                                                  N, S, s_tiles, cols, col_mask, dy_sa, dy_sc, dy_sb, x_sa, x_sc, x_sb,
                                                  r_sa, r_sc, r_sb, HAS_RESIDUAL, ACTIVATION, LAYOUT, BLOCK_R, BLOCK_S,
                                                  INDEX_I64, COMPUTE)
            if STORE_DZ:
                _store_tile(dz_ptr, dz_t, t, R, N, S, s_tiles, cols, mask_t, dz_sa, dz_sc, dz_sb, LAYOUT, BLOCK_R,
                            BLOCK_S, INDEX_I64)
            sum_dz += dz_t
            sum_dz_centered += dz_t * centered_t
            t += 1
        store_partials(sums_ptr + 2 * C, C, num_splits, cols, col_mask, tl.sum(sum_dz, axis=0),
                       tl.sum(sum_dz_centered, axis=0) * rstd)
        if PHASE == TICKET:
            if take_ticket(counters_ptr, num_splits):
                total_dz, total_dz_xhat = sum_partials(sums_ptr + 2 * C, C, cols, col_mask, num_splits, SPLIT_BLOCK,
                                                       BLOCK_C, COMPUTE)
                _finish_sums(sums_ptr, dweight_ptr, dbias_ptr, total_dz, total_dz_xhat, cols, col_mask, C, True,
                             True, STORE_DWEIGHT, STORE_DBIAS)
    if PHASE == PERSISTENT:
        grid_barrier(counters_ptr)
    if PHASE == APPLY or PHASE == PERSISTENT:
        mean_dz = tl.zeros_like(mean)
        mean_dz_xhat = tl.zeros_like(mean)
        if (TRAINING and STORE_DX) or PHASE == PERSISTENT or SUMS == MERGE:
            if PHASE == PERSISTENT or SUMS == MERGE:  # every program adds the partials; split 0 stores
                partial_splits = num_splits if PHASE == PERSISTENT else num_partials
                total_dz, total_dz_xhat = sum_partials(sums_ptr + 2 * C, C, cols, col_mask, partial_splits,
                                                       SPLIT_BLOCK, BLOCK_C, COMPUTE)
                _finish_sums(sums_ptr, dweight_ptr, dbias_ptr, total_dz, total_dz_xhat, cols, col_mask, C,
                             tl.program_id(1) == 0, False, STORE_DWEIGHT, STORE_DBIAS)
            else:
                total_dz = tl.load(sums_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
                total_dz_xhat = tl.load(sums_ptr + C + cols, mask=col_mask, other=0.0).to(COMPUTE)
            # Promote through a COMPUTE tensor: the int may arrive as a constexpr (Triton specialises 1).
            inv_count = 1.0 / (tl.zeros_like(mean) + count)
            mean_dz = total_dz * inv_count
            mean_dz_xhat = total_dz_xhat * inv_count
        if PHASE == PERSISTENT:  # the split's one tile, dz and x - mean still in registers
            if STORE_DX:
                _store_tile(dx_ptr, _input_grad(dz, centered, rstd, scale, mean_dz, mean_dz_xhat, TRAINING), first,
                            R, N, S, s_tiles, cols, mask, dx_sa, dx_sc, dx_sb, LAYOUT, BLOCK_R, BLOCK_S, INDEX_I64)
        elif STORE_DX or STORE_DZ:
            t = first
            while t < end:
                if LOAD_DZ:
                    a, b, row_mask = tile_rows(t, R, N, S, s_tiles, LAYOUT, BLOCK_R, BLOCK_S)
                    mask = row_mask[:, None] & col_mask[None, :]
                    dz = tl.load(dz_ptr + tile_offsets(a, b, cols, S, dz_sa, dz_sc, dz_sb, LAYOUT, INDEX_I64),
                                 mask=mask, other=0.0).to(COMPUTE)
                    centered = dz  # only read in training, where it is loaded below
                    if TRAINING:
                        x = tl.load(x_ptr + tile_offsets(a, b, cols, S, x_sa, x_sc, x_sb, LAYOUT, INDEX_I64),
                                    mask=mask, other=0.0).to(COMPUTE)
                        centered = x - mean[None, :]
                else:
                    dz, centered, mask = _grad_tile(dy_ptr, x_ptr, residual_ptr, t, mean, scale, bias,
                                                    negative_slope, R, N, S, s_tiles, cols, col_mask, dy_sa, dy_sc,
                                                    dy_sb, x_sa, x_sc, x_sb, r_sa, r_sc, r_sb, HAS_RESIDUAL,
                                                    ACTIVATION, LAYOUT, BLOCK_R, BLOCK_S, INDEX_I64, COMPUTE)
                if STORE_DZ:
                    _store_tile(dz_ptr, dz, t, R, N, S, s_tiles, cols, mask, dz_sa, dz_sc, dz_sb, LAYOUT, BLOCK_R,
                                BLOCK_S, INDEX_I64)
                if STORE_DX:
                    _store_tile(dx_ptr, _input_grad(dz, centered, rstd, scale, mean_dz, mean_dz_xhat, TRAINING), t,
                                R, N, S, s_tiles, cols, mask, dx_sa, dx_sc, dx_sb, LAYOUT, BLOCK_R, BLOCK_S, INDEX_I64)
                t += 1


# --------------------------------------------------------------------------------------------------
# Plan and launcher
# --------------------------------------------------------------------------------------------------


def backward_tiling(forward, dy_ncs, has_residual, config=None):
    """(the (n, c, s) strides of dy, x, the residual and the gradients, the configuration, the tiling) of the
    backward of ``forward`` for a gradient of (n, c, s) strides ``dy_ncs``; ``has_residual``: the residual is read."""
    shape, N, C, S = forward.shape, forward.N, forward.C, forward.S
    grad_ncs = ncs_strides(shape, output_layout(shape, forward.out_stride)[0])  # dx's and dz's layout
    all_ncs = [dy_ncs, forward.x_ncs, forward.r_ncs if has_residual else forward.x_ncs, grad_ncs]
    family = layout_family(N, S, all_ncs)
    config = config or choose("bwd", forward.dtype, LAYOUT_NAMES[family], N, C, S, forward.device)
    return all_ncs, config, Tiling(config, family, N, C, S, forward.device)


def sums_numel(tiling, C) -> int:
    """Elements of a backward's sums: the [2, C] totals, then the [2, splits, C] partials."""
    return 2 * C + 2 * tiling.num_splits * C


class BackwardPlan:
    """A backward call's layouts, buffers and launches, made once per forward plan, gradient layout and set
    of gradients wanted: (input, weight, bias, residual). Tensors are addressed as the forward plan's are."""

    def __init__(self, forward, dy, weight, bias, residual, needs, config=None, cooperative=True,
                 whole_workspace=True):
        need_input, need_weight, need_bias, need_residual = needs
        shape, N, C, S = forward.shape, forward.N, forward.C, forward.S
        identity = forward.activation_id == IDENTITY.value
        self.forward = forward
        self.device, self.index = forward.device, forward.index
        dy_ncs, self.copy_dy = operand_layout(shape, dy.stride())
        self.dx_stride = output_layout(shape, forward.out_stride)[0]
        # The residual is only read to recompute z, which the identity does not need.
        has_residual = residual is not None and not identity
        self.copy_residual = has_residual and forward.copy_residual
        self.copies = self.copy_dy or forward.copy_input or self.copy_residual or None in forward.vector_strides
        all_ncs, self.config, self.tiling = backward_tiling(forward, dy_ncs, has_residual, config)
        tiling = self.tiling
        strides = [kernel_strides(tiling.layout, S, ncs) for ncs in all_ncs]
        self.dz_dtype = dy.dtype
        # The residual's gradient is dz = dy * act'(z): dy itself for the identity, else written by the first
        # pass that computes dz and read back by the second instead of recomputed.
        self.dresidual_is_dy = need_residual and identity
        need_dz = need_residual and not identity
        self.need_input, self.need_weight, self.need_bias, self.need_dz = need_input, need_weight, need_bias, need_dz
        self.workspace_numel = sums_numel(tiling, C)
        self.stats_dtype = forward.stats_dtype
        # The sums pass runs where the weight or bias gradient, or a training input gradient, needs the sums.
        sums = need_weight or need_bias or (forward.training and need_input)
        variant = self.config.variant if sums else "apply"
        # The sums where the forward's partials were, after its mean and rstd, where a call passes the forward's
        # whole workspace as ``stats`` (``whole_workspace``; the custom ops pass its first 2 * C) and they fit
        # (the forward sizes it for a gradient laid out as its output): the workspace lives until backward
        # anyway, and a call allocates one tensor less.
        self.sums_in_stats = whole_workspace and forward.training and variant != "apply" and \
            2 * C + self.workspace_numel <= forward.workspace_numel
        if variant == "persistent" and (tiling.multiprocessors is None or not cooperative):
            variant = "merge"  # the barrier's two halves as two launches (see ForwardPlan)
        flags = (weight is not None, bias is not None, has_residual)
        grads = (need_dz, need_input, need_weight, need_bias)
        phases = {
            "apply": [(APPLY, GIVEN, (need_dz, False, need_input))],
            "ticket": [(TICKET, GIVEN, (need_dz, False, False))] + ([(APPLY, GIVEN, (False, need_dz, True))]
                                                                    if need_input else []),
            "merge": [(PARTIALS, GIVEN, (need_dz, False, False)), (APPLY, MERGE, (False, need_dz, need_input))],
            "persistent": [(PERSISTENT, GIVEN, (need_dz, False, need_input))],
        }[variant]
        self.counter_slots = tiling.channel_blocks + 1 if variant in ("ticket", "persistent") else 0
        self.uses_sums = variant != "apply"
        sums_offset = 2 * C if self.sums_in_stats else 0
        tail = (sums_offset, forward.count, *tiling.sizes(N, C, S), tiling.num_splits, *strides[0], *strides[1],
                *strides[2], *strides[3], *strides[3],
                *(1 if step is None else step for step in forward.vector_strides))
        tile = tiling.constexprs(needs_int64(shape, all_ncs), forward.compute)
        stats = (GIVEN if forward.training else RUNNING).value
        self.idle_counters = stream_free_counters(self)
        self.direct_ready = False  # every launcher compiled, so a call may pass addresses (launch.launch_all)
        self.launches = []
        for phase, sums_from, (store_dz, load_dz, store_dx) in phases:
            # An input pass without rows to write (the merge variant's weight and bias totals): one split.
            rows_pass = phase != APPLY or store_dz or store_dx
            grid = tiling.grid if rows_pass else (tiling.channel_blocks, 1)
            launcher = Launcher(backward_kernel, grid, tiling.num_warps, cooperative=phase == PERSISTENT)
            self.launches.append((launcher, (*tail, phase.value, stats, sums_from.value, forward.training, *flags,
                                             store_dz, load_dz, store_dx, *grads[2:], forward.activation_id, *tile)))

    def __call__(self, dy, x, stats, weight, bias, residual, running_mean, running_var, eps, negative_slope,
                 launch=None):
        """(grad input, grad weight, grad bias, grad residual), None for those not wanted; ``launch`` as for
        ForwardPlan."""
        forward = self.forward
        if self.copies:  # rare: see ForwardPlan
            dy, x = (dy.contiguous() if self.copy_dy else dy), (x.contiguous() if forward.copy_input else x)
            residual = residual.contiguous() if self.copy_residual else residual
            weight, bias, running_mean, running_var = dense_vectors(forward.vector_strides, weight, bias,
                                                                    running_mean, running_var)
        device, shape = forward.device, forward.shape
        # empty_like where it gives the layout and dtype wanted (x saved as the forward took it, dense per-channel
        # gradients in their parameters' shapes): the same tensors, without parsing them.
        dx = None
        if self.need_input:
            dx = torch.empty_like(x) if not forward.copy_input else torch.empty_strided(shape, self.dx_stride,
                                                                                         dtype=x.dtype, device=device)
        dz = torch.empty_strided(shape, self.dx_stride, dtype=self.dz_dtype, device=device) if self.need_dz else None
        dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if self.need_weight else None
        dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if self.need_bias else None
        dresidual = dy if self.dresidual_is_dy else dz
        if forward.empty:
            for grad in (dweight, dbias):
                if grad is not None:
                    grad.zero_()
            return dx, dweight, dbias, dresidual
        sums = x
        if self.sums_in_stats:
            sums = stats
        elif self.uses_sums:  # the forward's workspace (training) has the dtype: its new_empty parses none
            sums = stats.new_empty(self.workspace_numel) if stats is not None else torch.empty(
                self.workspace_numel, dtype=self.stats_dtype, device=device)
        if launch is None:
            direct, count = call_state(self, (dy, x, residual, weight, bias, running_mean, running_var))
        else:
            direct = None
            count = torch.zeros(self.counter_slots, dtype=torch.int32, device=device) if self.counter_slots else None
        tensors = (dy, x, x if residual is None else residual, x if stats is None else stats,
                   x if weight is None else weight, x if bias is None else bias,
                   x if running_mean is None else running_mean, x if running_var is None else running_var, sums,
                   x if count is None else count, x if dz is None else dz, x if dx is None else dx,
                   x if dweight is None else dweight, x if dbias is None else dbias)
        floats = float_args(eps, negative_slope)
        if launch is None:
            launch_all(self, direct, tensors, floats)
        else:
            for launcher, tail in self.launches:
                launch(launcher, (*tensors, *floats, *tail))
        return dx, dweight, dbias, dresidual
