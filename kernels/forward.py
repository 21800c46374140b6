"""The forward kernel family: batch moments, then normalise + residual add + activation.

One jit function, ``forward_kernel``; its PHASE constexpr says what a launch does (tiles.py):
- PARTIALS / TICKET: each program accumulates its split's (count, mean, M2) per channel (per-lane shifted
  sums, FMA only, reduced across the tile once at the end) and writes them; with TICKET the last program of
  each channel block merges them once into mean and rstd, stores those for backward and updates the
  running statistics.
- APPLY: y = act((x - mean) * rstd * weight + bias [+ residual]) with the statistics GIVEN (finalized by
  the ticket), MERGEd by each program from the partials (the merge variant), or from the RUNNING ones (eval).
- PERSISTENT: both in one launch, the tile kept in registers across a grid-wide barrier (one tile a program).
- MOMENTS (SyncBatchNormAct): PARTIALS, then the ticket's last program stores the rank's merged (count, mean
  head, mean tail, M2) for the group to gather; APPLY with the statistics GATHERED then merges the ranks'.

Traffic in passes over one activation tensor (the residual adds its own read):
  training, two launches: read x (moments), read x + write y (normalise)   = 3
  training, persistent:   read x, write y                                   = 2
  eval:                   read x + write y                                  = 2
The workspace holds [2, C] mean and rstd (what backward needs), then the [4, splits, C] partials, or more where
the backward's sums, which it writes there, need more; MOMENTS's holds the rank's [4, C] moments in place of mean
and rstd.
"""

import torch
import triton
import triton.language as tl

from ..reference import output_dtype
from .activations import IDENTITY, activation_forward
from .backward import BackwardPlan, backward_tiling, sums_numel
from .configs import choose
from .launch import Launcher, call_state, launch_all, stream_free_counters
from .plan import (
    LAYOUT_NAMES,
    Tiling,
    compute_dtype,
    dense_vectors,
    device_index,
    float_args,
    kernel_strides,
    layout_family,
    ncs_strides,
    needs_int64,
    operand_layout,
    output_layout,
    spatial_size,
    stats_dtype,
    vector_stride,
)
from .tiles import (
    APPLY,
    GATHERED,
    GIVEN,
    MERGE,
    MOMENTS,
    PARTIALS,
    PERSISTENT,
    RUNNING,
    TICKET,
    affine,
    channel_block,
    channel_stats,
    count_batch,
    finite_or_zero,
    gathered_stats,
    grid_barrier,
    nonnegative,
    scalar,
    split_tiles,
    take_ticket,
    tile_offsets,
    tile_rows,
)


@triton.jit
def _load_tile(x_ptr, t, R, N, S, s_tiles, cols, col_mask, x_sa, x_sc, x_sb, LAYOUT: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, INDEX_I64: tl.constexpr, COMPUTE: tl.constexpr):
    """(x, mask, rows) of tile ``t``: its values (0 where masked off), mask and number of rows."""
    a, b, row_mask = tile_rows(t, R, N, S, s_tiles, LAYOUT, BLOCK_R, BLOCK_S)
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + tile_offsets(a, b, cols, S, x_sa, x_sc, x_sb, LAYOUT, INDEX_I64), mask=mask, other=0.0)
    return x.to(COMPUTE), mask, tl.sum(row_mask.to(COMPUTE), axis=0)


@triton.jit
def _two_sum(shift, offset):
    """(head, tail): head = shift + offset rounded, and what the rounding dropped, exactly (Knuth's two-sum);
    a non-finite head gets no tail (inf - inf would be NaN)."""
    head = shift + offset
    offset_part = head - shift
    tail = (shift - (head - offset_part)) + (offset - offset_part)
    return head, tl.where(head - head == 0.0, tail, 0.0)


@triton.jit
def _split_moments(x, mask, rows, x_ptr, t, end, R, N, S, s_tiles, cols, col_mask, x_sa, x_sc, x_sb,
                   LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, INDEX_I64: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """(count, mean head, mean tail, M2) per channel of a split whose first tile is loaded (``x``, ``mask``,
    ``rows``) and whose other tiles run from ``t`` to ``end``.

    Deviations are taken from the first tile's mean (which they all stay close to, so a channel with mean
    1e4 and std 1 keeps full precision) and summed per lane, FMA only: one cross-thread reduction at the end
    instead of one per tile. The mean leaves as a float32 head and its rounding error (an exact two-sum),
    so the merge across splits loses nothing to the head's rounding (which, at mean 1e4 and std 1, would be
    1e-5 of the variance).
    """
    shift = finite_or_zero(tl.sum(x, axis=0) / rows)
    deviation = tl.where(mask, x - shift[None, :], 0.0)
    sum_dev = deviation
    sum_sq = deviation * deviation
    count = rows
    while t < end:
        x, mask, rows = _load_tile(x_ptr, t, R, N, S, s_tiles, cols, col_mask, x_sa, x_sc, x_sb, LAYOUT, BLOCK_R,
                                   BLOCK_S, INDEX_I64, COMPUTE)
        deviation = tl.where(mask, x - shift[None, :], 0.0)
        sum_dev += deviation
        sum_sq += deviation * deviation
        count += rows
        t += 1
    total_dev = tl.sum(sum_dev, axis=0)
    offset = total_dev / count
    m2 = nonnegative(tl.sum(sum_sq, axis=0) - total_dev * offset)
    head, tail = _two_sum(shift, offset)
    return tl.zeros_like(shift) + count, head, tail, m2


@triton.jit
def _merge_moments(part_ptr, C, cols, col_mask, num_splits, SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """(count, shift, offset, M2) of the channels ``cols`` from [4, num_splits, C] partials (counts, mean heads,
    mean tails, M2s): their mean is shift + offset.

    The parallel-variance merge, M2 = sum of (M2_i + n_i (mean_i - mean)^2), in [SPLIT_BLOCK, BLOCK_C] tiles
    in split order, with deviations (head_i - head_0) + tail_i from split 0's head: the heads' difference is
    exact (they are close) and the tails carry what the heads rounded off, so the merge is as precise as one
    split. The same bits in every program that merges. Loads bypass L1: other programs of the same launch
    may have written them.
    """
    split_size = num_splits * C
    shift = finite_or_zero(tl.load(part_ptr + split_size + cols, mask=col_mask, other=0.0,
                                   cache_modifier=".cg").to(COMPUTE))
    count = tl.zeros([BLOCK_C], dtype=COMPUTE)
    sum_dev = tl.zeros([BLOCK_C], dtype=COMPUTE)
    sum_sq = tl.zeros([BLOCK_C], dtype=COMPUTE)
    first = 0
    while first < num_splits:
        splits = first + tl.arange(0, SPLIT_BLOCK)
        offsets = splits[:, None] * C + cols[None, :]
        mask = (splits < num_splits)[:, None] & col_mask[None, :]
        counts = tl.load(part_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(COMPUTE)
        heads = tl.load(part_ptr + split_size + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(COMPUTE)
        tails = tl.load(part_ptr + 2 * split_size + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        m2s = tl.load(part_ptr + 3 * split_size + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        deviation = tl.where(mask, (heads - shift[None, :]) + tails.to(COMPUTE), 0.0)
        count += tl.sum(counts, axis=0)
        sum_dev += tl.sum(counts * deviation, axis=0)
        sum_sq += tl.sum(m2s.to(COMPUTE) + counts * deviation * deviation, axis=0)
        first += SPLIT_BLOCK
    count = tl.where(col_mask, count, 1.0)  # channels past C: no 0 / 0 (which the interpreter warns about)
    offset = sum_dev / count
    return count, shift, offset, nonnegative(sum_sq - sum_dev * offset)


@triton.jit
def _running_factor(momentum_hi, momentum_lo, batches, like, CUMULATIVE: tl.constexpr):
    """The running averages' factor, shaped like ``like``: ``momentum`` (a float32 head and tail), or with
    CUMULATIVE (``momentum=None``) 1 / ``batches``, the num_batches_tracked count that includes this batch, read on
    the device (as _BatchNorm's 1 / num_batches_tracked after its increment)."""
    if CUMULATIVE:
        return 1.0 / (tl.zeros_like(like) + batches.to(like.dtype))
    return scalar(momentum_hi, momentum_lo, like)


@triton.jit
def _update_running(running_mean_ptr, running_var_ptr, rm_s, rv_s, factor, count, mean, m2, cols, col_mask,
                    COMPUTE: tl.constexpr):
    """Move the running statistics towards the batch's (unbiased variance): factor * batch + (1 - factor) *
    running, PyTorch's own formula, so a factor of 1 gives the batch's statistics exactly and an inf running
    value stays inf where the factor is below 1. A channel without values (count 0: every rank of a group
    empty) keeps its running statistics, as an empty batch does."""
    keep = 1.0 - factor
    running_mean = tl.load(running_mean_ptr + cols * rm_s, mask=col_mask, other=0.0).to(COMPUTE)
    running_var = tl.load(running_var_ptr + cols * rv_s, mask=col_mask, other=0.0).to(COMPUTE)
    running_mean = factor * mean + keep * running_mean
    # Unbiased, as PyTorch; channels past C (count 1 there) divide by 1, not 0.
    running_var = factor * (m2 / tl.where(col_mask, count - 1.0, 1.0)) + keep * running_var
    update = col_mask & (count > 0.0)
    tl.store(running_mean_ptr + cols * rm_s, running_mean.to(running_mean_ptr.dtype.element_ty), mask=update)
    tl.store(running_var_ptr + cols * rv_s, running_var.to(running_var_ptr.dtype.element_ty), mask=update)


@triton.jit
def _finalize(workspace_ptr, counters_ptr, running_mean_ptr, running_var_ptr, rm_s, rv_s, batches_ptr, eps_hi, eps_lo,
              momentum_hi, momentum_lo, C, cols, col_mask, num_splits, store, UPDATE_RUNNING: tl.constexpr,
              COUNT_BATCHES: tl.constexpr, CUMULATIVE: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
              COMPUTE: tl.constexpr):
    """(mean, rstd) of the batch from the partials after the workspace's [2, C] statistics; where ``store`` holds,
    those are stored there, the running statistics updated (``_update_running``) and, with COUNT_BATCHES, the batch
    counted in num_batches_tracked (``count_batch``: every finalizer reads the count before it)."""
    count, shift, offset, m2 = _merge_moments(workspace_ptr + 2 * C, C, cols, col_mask, num_splits, SPLIT_BLOCK,
                                              BLOCK_C, COMPUTE)
    mean = shift + offset
    rstd = 1.0 / tl.sqrt(m2 / count + scalar(eps_hi, eps_lo, mean))
    if store:
        tl.store(workspace_ptr + cols, mean, mask=col_mask)
        tl.store(workspace_ptr + C + cols, rstd, mask=col_mask)
        if UPDATE_RUNNING:
            batches = 0
            if COUNT_BATCHES:
                batches = tl.load(batches_ptr) + 1  # the count with this batch
            _update_running(running_mean_ptr, running_var_ptr, rm_s, rv_s,
                            _running_factor(momentum_hi, momentum_lo, batches, mean, CUMULATIVE), count, mean, m2,
                            cols, col_mask, COMPUTE)
            if COUNT_BATCHES:
                count_batch(counters_ptr, batches_ptr, batches)
    return mean, rstd


@triton.jit
def _store_moments(workspace_ptr, C, cols, col_mask, num_splits, SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """This rank's (count, mean head, mean tail, M2), merged from the partials after the workspace's [4, C],
    stored there for the group to gather (SyncBatchNormAct): the tail keeps what the head's rounding drops, so
    the merge across ranks is as precise as the one across splits."""
    count, shift, offset, m2 = _merge_moments(workspace_ptr + 4 * C, C, cols, col_mask, num_splits, SPLIT_BLOCK,
                                              BLOCK_C, COMPUTE)
    head, tail = _two_sum(shift, offset)
    tl.store(workspace_ptr + cols, count, mask=col_mask)
    tl.store(workspace_ptr + C + cols, head, mask=col_mask)
    tl.store(workspace_ptr + 2 * C + cols, tail, mask=col_mask)
    tl.store(workspace_ptr + 3 * C + cols, m2, mask=col_mask)


@triton.jit
def _normalize_tile(x, t, y_ptr, residual_ptr, mean, scale, bias, negative_slope, R, N, S, s_tiles, cols, col_mask,
                    y_sa, y_sc, y_sb, r_sa, r_sc, r_sb, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                    LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, INDEX_I64: tl.constexpr,
                    COMPUTE: tl.constexpr):
    """Store act((x - mean) * scale + bias [+ residual]) for tile ``t`` whose x is given."""
    a, b, row_mask = tile_rows(t, R, N, S, s_tiles, LAYOUT, BLOCK_R, BLOCK_S)
    mask = row_mask[:, None] & col_mask[None, :]
    # (x - mean) first: folding mean into the shift would cancel catastrophically for large means.
    z = (x - mean[None, :]) * scale[None, :] + bias[None, :]
    if HAS_RESIDUAL:
        r_offsets = tile_offsets(a, b, cols, S, r_sa, r_sc, r_sb, LAYOUT, INDEX_I64)
        z += tl.load(residual_ptr + r_offsets, mask=mask, other=0.0).to(COMPUTE)
    y = activation_forward(z, negative_slope, ACTIVATION)
    y_offsets = tile_offsets(a, b, cols, S, y_sa, y_sc, y_sb, LAYOUT, INDEX_I64)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def forward_kernel(
    x_ptr,  # input
    y_ptr,  # out (APPLY, PERSISTENT): act((x - mean) * rstd * weight + bias [+ residual]), output dtype
    residual_ptr,  # residual added before the activation (read when HAS_RESIDUAL)
    workspace_ptr,  # [2, C] mean and rstd (out, or in when GIVEN), then the [4, num_splits, C] partials; MOMENTS:
    # [4, C] this rank's moments (out), then the partials; GATHERED: the ranks' [ranks, 4, C] moments (in)
    counters_ptr,  # int32 ticket counters and grid barrier (tiles.py), zero at rest
    weight_ptr, bias_ptr,  # [C] affine parameters (read when HAS_WEIGHT / HAS_BIAS)
    running_mean_ptr, running_var_ptr,  # [C] folded in eval (STATS == RUNNING), updated when UPDATE_RUNNING
    batches_ptr,  # num_batches_tracked: incremented when COUNT_BATCHES (else counted already), the CUMULATIVE factor's
    eps_hi, eps_lo,  # eps as a float32 head and tail
    momentum_hi, momentum_lo,  # running-average factor as a float32 head and tail (unless CUMULATIVE)
    slope_hi, slope_lo,  # leaky_relu's negative slope as a float32 head and tail
    R, N, C, S,  # rows (N * S), samples, channels, spatial size (product of the dims after C; 1 for 2-D)
    s_tiles, num_tiles, tiles_per_split,  # PLANES: tiles per sample run; tiles in all; tiles per split
    num_partials,  # splits of the partials being merged (STATS == MERGE), or ranks (STATS == GATHERED)
    x_sa, x_sc, x_sb,  # strides of x (plan.kernel_strides)
    y_sa, y_sc, y_sb,  # strides of y
    r_sa, r_sc, r_sb,  # strides of the residual
    w_s, b_s, rm_s, rv_s,  # element strides of weight, bias, running_mean and running_var
    PHASE: tl.constexpr,  # PARTIALS, TICKET, APPLY, PERSISTENT or MOMENTS (tiles.py)
    STATS: tl.constexpr,  # APPLY: GIVEN, MERGE, RUNNING or GATHERED (tiles.py)
    UPDATE_RUNNING: tl.constexpr,  # fold the batch statistics into the running ones
    COUNT_BATCHES: tl.constexpr,  # count this batch in num_batches_tracked (a module's training call)
    CUMULATIVE: tl.constexpr,  # the factor is 1 / num_batches_tracked (momentum=None), not momentum
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # activation id, see activations.py
    LAYOUT: tl.constexpr,  # ROWS, PLANES or STRIDED (plan.py)
    SPLIT_BLOCK: tl.constexpr,  # partial splits merged per step
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile: rows, channels, PLANES run
    INDEX_I64: tl.constexpr,  # offsets need int64
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 input
):
    cols, col_mask = channel_block(C, BLOCK_C)
    num_splits = tl.num_programs(1)
    first, end = split_tiles(num_tiles, tiles_per_split)
    if PHASE != APPLY:
        x, mask, rows = _load_tile(x_ptr, first, R, N, S, s_tiles, cols, col_mask, x_sa, x_sc, x_sb, LAYOUT,
                                   BLOCK_R, BLOCK_S, INDEX_I64, COMPUTE)
        count, head, tail, m2 = _split_moments(x, mask, rows, x_ptr, first + 1, end, R, N, S, s_tiles, cols,
                                               col_mask, x_sa, x_sc, x_sb, LAYOUT, BLOCK_R, BLOCK_S, INDEX_I64,
                                               COMPUTE)
        if PHASE == MOMENTS:
            partials = workspace_ptr + 4 * C + tl.program_id(1) * C + cols
        else:
            partials = workspace_ptr + 2 * C + tl.program_id(1) * C + cols
        tl.store(partials, count, mask=col_mask)
        tl.store(partials + num_splits * C, head, mask=col_mask)
        tl.store(partials + 2 * num_splits * C, tail, mask=col_mask)
        tl.store(partials + 3 * num_splits * C, m2, mask=col_mask)
        if PHASE == TICKET:
            if take_ticket(counters_ptr, num_splits):
                _finalize(workspace_ptr, counters_ptr, running_mean_ptr, running_var_ptr, rm_s, rv_s, batches_ptr,
                          eps_hi, eps_lo, momentum_hi, momentum_lo, C, cols, col_mask, num_splits, True,
                          UPDATE_RUNNING, COUNT_BATCHES, CUMULATIVE, SPLIT_BLOCK, BLOCK_C, COMPUTE)
        elif PHASE == MOMENTS:
            if take_ticket(counters_ptr, num_splits):
                _store_moments(workspace_ptr, C, cols, col_mask, num_splits, SPLIT_BLOCK, BLOCK_C, COMPUTE)
    if PHASE == PERSISTENT:
        grid_barrier(counters_ptr)
    if PHASE == APPLY or PHASE == PERSISTENT:
        if PHASE == PERSISTENT or STATS == MERGE:
            # Every program merges its channels' partials; split 0's programs store them and update.
            partial_splits = num_splits if PHASE == PERSISTENT else num_partials
            mean, rstd = _finalize(workspace_ptr, counters_ptr, running_mean_ptr, running_var_ptr, rm_s, rv_s,
                                   batches_ptr, eps_hi, eps_lo, momentum_hi, momentum_lo, C, cols, col_mask,
                                   partial_splits, tl.program_id(1) == 0, UPDATE_RUNNING, COUNT_BATCHES, CUMULATIVE,
                                   SPLIT_BLOCK, BLOCK_C, COMPUTE)
        elif STATS == GATHERED:
            # SyncBatchNormAct: every program merges the ranks' moments; split 0's programs update.
            count, mean, m2, rstd = gathered_stats(workspace_ptr, eps_hi, eps_lo, C, cols, col_mask, num_partials,
                                                   BLOCK_C, COMPUTE)
            if UPDATE_RUNNING:
                if tl.program_id(1) == 0:
                    batches = 0
                    if CUMULATIVE:
                        batches = tl.load(batches_ptr)  # the module counted this batch before the call
                    _update_running(running_mean_ptr, running_var_ptr, rm_s, rv_s,
                                    _running_factor(momentum_hi, momentum_lo, batches, mean, CUMULATIVE), count, mean,
                                    m2, cols, col_mask, COMPUTE)
        else:
            mean, rstd = channel_stats(workspace_ptr, running_mean_ptr, running_var_ptr, rm_s, rv_s, eps_hi, eps_lo, C,
                                       cols, col_mask, STATS, COMPUTE)
        scale, bias = affine(rstd, weight_ptr, bias_ptr, w_s, b_s, cols, col_mask, HAS_WEIGHT, HAS_BIAS, COMPUTE)
        negative_slope = scalar(slope_hi, slope_lo, mean)
        if PHASE == PERSISTENT:  # the split's one tile, still in registers
            _normalize_tile(x, first, y_ptr, residual_ptr, mean, scale, bias, negative_slope, R, N, S, s_tiles, cols,
                            col_mask, y_sa, y_sc, y_sb, r_sa, r_sc, r_sb, HAS_RESIDUAL, ACTIVATION, LAYOUT, BLOCK_R,
                            BLOCK_S, INDEX_I64, COMPUTE)
        else:
            t = first
            while t < end:
                x, _, _ = _load_tile(x_ptr, t, R, N, S, s_tiles, cols, col_mask, x_sa, x_sc, x_sb, LAYOUT, BLOCK_R,
                                     BLOCK_S, INDEX_I64, COMPUTE)
                _normalize_tile(x, t, y_ptr, residual_ptr, mean, scale, bias, negative_slope, R, N, S, s_tiles, cols,
                                col_mask, y_sa, y_sc, y_sb, r_sa, r_sc, r_sb, HAS_RESIDUAL, ACTIVATION, LAYOUT,
                                BLOCK_R, BLOCK_S, INDEX_I64, COMPUTE)
                t += 1


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------


class ForwardPlan:
    """Everything a forward call needs that depends only on its tensors' shapes, strides and dtypes, its
    options and the configuration: the layouts, the tiling, the buffers to allocate and the launches.

    Every tensor is addressed by its own strides (``operand_layout``, ``vector_stride``); one whose layout the
    kernels cannot address is read from a contiguous copy, and a running statistic of that kind is updated
    through one and copied back. ``counting``: 0, or a module's training call that counts its batch in
    num_batches_tracked (1), with momentum=None's factor 1 / num_batches_tracked (2); the kernels count it.
    Backward plans for the same forward hang off it (``backward_plans``), so backward finds its own with one
    dictionary look-up. ``config`` overrides the tuning table's choice (``tritonbn-perf tune``, the tests).
    """

    def __init__(self, x, weight, bias, residual, running_mean, running_var, training, activation_id, config=None,
                 cooperative=True, counting=0):
        shape, stride = tuple(x.shape), x.stride()
        self.out_dtype = output_dtype(x, residual)
        self.out_stride = output_layout(shape, stride)[0]
        self.shape = shape
        self.x_ncs, self.copy_input = operand_layout(shape, stride)
        self.r_ncs, self.copy_residual = operand_layout(shape, residual.stride()) if residual is not None else (
            None, False)
        self.N, self.C, self.S = shape[0], shape[1], spatial_size(shape)
        self.R = self.count = self.N * self.S  # values per channel the statistics are taken over
        self.empty = self.R == 0 or self.C == 0
        self.dtype = x.dtype
        self.stats_dtype = stats_dtype(x.dtype)
        self.compute = compute_dtype(x.dtype)
        self.training = training
        self.update_running = training and running_mean is not None
        self.count_batches = counting > 0 and self.update_running
        cumulative = counting == 2 and self.update_running
        self.vector_strides = tuple(map(vector_stride, (weight, bias, running_mean, running_var)))
        # Rare, so one flag keeps them off the common path: x, the residual or a per-channel tensor copied.
        self.copies = self.copy_input or self.copy_residual or None in self.vector_strides
        self.y_like_x = not self.copy_input and self.out_dtype == x.dtype  # output_layout is empty_like's layout
        self.activation_id = activation_id
        self.needs_residual = residual is not None and activation_id != IDENTITY.value  # to rebuild z in backward
        self.cooperative = cooperative
        self.backward_plans = {}
        all_ncs = [self.x_ncs, ncs_strides(shape, self.out_stride)] + ([self.r_ncs] if residual is not None else [])
        family = layout_family(self.N, self.S, all_ncs)
        self.config = config or choose("fwd" if training else "eval", x.dtype, LAYOUT_NAMES[family], self.N, self.C,
                                       self.S, x.device)
        self.tiling = tiling = Tiling(self.config, family, self.N, self.C, self.S, x.device)
        strides = [kernel_strides(tiling.layout, self.S, ncs) for ncs in all_ncs] + [(0, 0, 0)]
        self.device = x.device
        self.index = device_index(x.device)
        # Mean and rstd, then the partials, or, where longer, the sums of a backward whose gradient is laid out as
        # the output (the usual one): that backward writes them here instead of allocating (sums_in_stats).
        partials = 4 * tiling.num_splits * self.C
        if training:
            backward = backward_tiling(self, all_ncs[1], self.needs_residual)[2]  # dy laid out as the output
            partials = max(partials, sums_numel(backward, self.C))
        self.workspace_numel = 2 * self.C + partials
        flags = (self.update_running, self.count_batches, cumulative, weight is not None, bias is not None,
                 residual is not None, activation_id)
        tail = (*tiling.sizes(self.N, self.C, self.S), tiling.num_splits, *strides[0], *strides[1], *strides[2],
                *(1 if step is None else step for step in self.vector_strides))
        tile = tiling.constexprs(needs_int64(shape, all_ncs), self.compute)
        variant = self.config.variant if training else "eval"
        if variant == "persistent" and (tiling.multiprocessors is None or not cooperative):
            # The interpreter runs programs one by one, and a launch that may not be cooperative may not wait
            # at a grid barrier: the barrier's two halves as two launches.
            variant = "merge"
        phases = {"eval": [(APPLY, RUNNING)], "ticket": [(TICKET, GIVEN), (APPLY, GIVEN)],
                  "merge": [(PARTIALS, GIVEN), (APPLY, MERGE)], "persistent": [(PERSISTENT, GIVEN)]}[variant]
        # Slot 0: the grid barrier; 1 + b: channel block b's ticket; 1 + blocks: the batch count's (tiles.py).
        tickets = variant in ("ticket", "persistent")
        self.counter_slots = tiling.channel_blocks + 1 + self.count_batches if tickets or self.count_batches else 0
        self.idle_counters = stream_free_counters(self)
        self.direct_ready = False  # every launcher compiled, so a call may pass addresses (launch.launch_all)
        self.launches = [
            (Launcher(forward_kernel, tiling.grid, tiling.num_warps, cooperative=phase == PERSISTENT),
             (*tail, phase.value, stats.value, *flags, *tile))
            for phase, stats in phases]

    def __call__(self, x, weight, bias, residual, running_mean, running_var, momentum, eps, negative_slope,
                 batches=None, launch=None):
        """(y, the workspace that begins with the batch's mean and rstd; None in eval). ``batches``: the
        num_batches_tracked counter of a ``counting`` plan (whose ``momentum`` is then None for momentum=None).

        ``launch(launcher, arguments)``, where given, launches instead of the launchers (torch.compile's triton
        ops: see tritonbn/triton_ops.py); the ticket counters are then this call's own, zeroed."""
        if self.copies:
            x, residual, weight, bias, running_mean, running_var, written = self._copied(
                x, residual, weight, bias, running_mean, running_var)
        device = self.device
        # empty_like(x) where it gives the output's layout and dtype: the same tensor, without parsing them.
        y = torch.empty_like(x) if self.y_like_x else torch.empty_strided(self.shape, self.out_stride,
                                                                            dtype=self.out_dtype, device=device)
        workspace = torch.empty(self.workspace_numel, dtype=self.stats_dtype, device=device) if self.training else None
        if self.empty:
            if self.count_batches:
                batches.add_(1)
            return y, workspace
        if launch is None:
            direct, count = call_state(self, (x, residual, weight, bias, running_mean, running_var, batches))
        else:
            direct = None
            count = torch.zeros(self.counter_slots, dtype=torch.int32, device=device) if self.counter_slots else None
        tensors = (x, y, x if residual is None else residual, x if workspace is None else workspace,
                   x if count is None else count, x if weight is None else weight, x if bias is None else bias,
                   x if running_mean is None else running_mean, x if running_var is None else running_var,
                   x if batches is None else batches)
        floats = float_args(eps, momentum or 0.0, negative_slope)
        if launch is None:
            launch_all(self, direct, tensors, floats)
        else:
            for launcher, tail in self.launches:
                launch(launcher, (*tensors, *floats, *tail))
        if self.copies and self.update_running:
            for target, updated in written:
                if target is not updated:
                    target.copy_(updated)
        return y, workspace

    def _copied(self, x, residual, weight, bias, running_mean, running_var):
        """The call's tensors with the ones the kernels cannot address replaced by copies they can (see the class
        docstring), and the (running statistic, copy updated in its place) pairs to copy back."""
        if self.copy_input:
            x = x.contiguous()
        if self.copy_residual:
            residual = residual.contiguous()
        vectors = dense_vectors(self.vector_strides, weight, bias, running_mean, running_var)
        return (x, residual, *vectors, tuple(zip((running_mean, running_var), vectors[2:])))

    def backward_plan(self, dy, weight, bias, residual, needs, whole_workspace=True):
        """The backward plan for gradient ``dy`` and the gradients ``needs`` says are wanted (input, weight, bias,
        residual, then any others), made on first use. ``whole_workspace``: its calls pass this plan's whole
        workspace as their ``stats`` (BatchNormActFunction), which the plan may write its sums into, rather than
        only the mean and rstd (the custom ops)."""
        key = (dy.stride(), dy.dtype, needs) if whole_workspace else (dy.stride(), dy.dtype, needs, False)
        plan = self.backward_plans.get(key)
        if plan is None:
            plan = self.backward_plans[key] = BackwardPlan(self, dy, weight, bias, residual, tuple(needs[:4]),
                                                           cooperative=self.cooperative,
                                                           whole_workspace=whole_workspace)
        return plan
