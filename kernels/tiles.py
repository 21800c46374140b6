"""Jit helpers shared by the forward and backward kernels: tile addressing per layout, per-channel values,
partial results and the grid-wide synchronisation of the ticket and persistent variants.

A program owns BLOCK_C channels (grid axis 0) and a split (axis 1): a run of ``tiles_per_split`` consecutive
tiles of BLOCK_R rows. Rows are (sample, spatial position) pairs. Per layout family (the LAYOUT constexpr):
- ROWS: the sample and spatial dims collapse into one row dim, offset = row * row_stride + c * stride_c
  (channels_last, (N, C)); no division anywhere.
- PLANES: offset = n * stride_n + c * stride_c + s with s contiguous (NCHW); a tile is BLOCK_R // BLOCK_S
  samples x BLOCK_S spatial positions, so rows split by a power of two (a shift), never by S.
- STRIDED: any (n, c, s) strides; row r is sample r // S, position r % S (a division per row).
Each tensor brings its own three strides (see plan.kernel_strides), so views and mixed layouts need no copy.
Offsets are int32 unless INDEX_I64 (a tensor that spans more than 2**31 elements).

SyncBatchNormAct's statistics are a process group's: each rank's forward stores its own (count, mean head,
mean tail, M2) per channel (PHASE == MOMENTS), the ranks' are gathered, and every program that needs the
group's statistics merges them itself, in rank order (STATS == GATHERED, ``gathered_stats``), in forward and
backward alike: the same bits in both, and no statistics to store between them.

Loops are ``while`` loops: triton 3.6's interpreter cannot bound a ``range`` by a runtime value (it converts
a one-element array to an int, which numpy >= 2.4 refuses); compiled, the two give the same code.
"""

import triton
import triton.language as tl

from . import plan

# The layout families (plan.py) as constexprs, for the jit functions to branch on.
ROWS = tl.constexpr(plan.ROWS)
PLANES = tl.constexpr(plan.PLANES)

# Where a kernel's per-channel statistics come from (the STATS constexpr).
GIVEN = tl.constexpr(0)  # read from a [2, C] buffer of mean and rstd (finalized already, or SyncBN's)
MERGE = tl.constexpr(1)  # merged by this program from the first launch's partials (the merge variant)
RUNNING = tl.constexpr(2)  # folded from the running statistics (eval)
GATHERED = tl.constexpr(3)  # merged by this program from the ranks' [ranks, 4, C] moments (SyncBatchNormAct)

# What a launch does (the PHASE constexpr).
PARTIALS = tl.constexpr(0)  # per-split partial results only (merge variant, SyncBN, persistent under the interpreter)
TICKET = tl.constexpr(1)  # partials, then the last program of each channel block finalizes them
APPLY = tl.constexpr(2)  # the elementwise pass: normalise (forward) or the input gradient (backward)
PERSISTENT = tl.constexpr(3)  # partials, a grid-wide barrier, then APPLY on the tile still in registers
MOMENTS = tl.constexpr(4)  # forward: partials, then the ticket's last program stores the rank's merged moments


@triton.jit
def channel_block(C, BLOCK_C: tl.constexpr):
    """This program's channels and which of them exist."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def split_tiles(num_tiles, tiles_per_split):
    """First and end tile of this program's split."""
    first = tl.program_id(1) * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, num_tiles)


@triton.jit
def tile_rows(t, R, N, S, s_tiles, LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """(a, b, row mask) of tile ``t``'s BLOCK_R rows: PLANES gives (sample, position), the others (row, row)."""
    i = tl.arange(0, BLOCK_R)
    if LAYOUT == PLANES:
        n = (t // s_tiles) * (BLOCK_R // BLOCK_S) + i // BLOCK_S
        s = (t % s_tiles) * BLOCK_S + i % BLOCK_S
        return n, s, (n < N) & (s < S)
    else:
        r = t * BLOCK_R + i
        return r, r, r < R


@triton.jit
def tile_offsets(a, b, cols, S, stride_a, stride_c, stride_s, LAYOUT: tl.constexpr, INDEX_I64: tl.constexpr):
    """Element offsets of a [BLOCK_R, BLOCK_C] tile of one tensor, from ``tile_rows``'s coordinates and that
    tensor's strides (ROWS: row stride, c stride; PLANES and STRIDED: n, c and s strides)."""
    if INDEX_I64:
        a = a.to(tl.int64)
        b = b.to(tl.int64)
        cols = cols.to(tl.int64)
    if LAYOUT == ROWS:
        rows = a * stride_a
    elif LAYOUT == PLANES:
        rows = a * stride_a + b
    else:
        n = a // S
        rows = n * stride_a + (a - n * S) * stride_s
    return rows[:, None] + cols[None, :] * stride_c


@triton.jit
def scalar(hi, lo, like):
    """A float argument, passed as a float32 head and tail (about 48 bits: a few float64 ulps, where a
    single float32 would lose 29 bits), as a tensor shaped and typed like ``like``."""
    return (tl.zeros_like(like) + hi) + lo


@triton.jit
def channel_stats(stats_ptr, running_mean_ptr, running_var_ptr, rm_s, rv_s, eps_hi, eps_lo, C, cols, col_mask,
                  STATS: tl.constexpr, COMPUTE: tl.constexpr):
    """Per-channel (mean, rstd), read from ``stats_ptr`` (mean, then rstd) or folded from the running
    statistics (STATS == RUNNING: eval mode; element strides ``rm_s`` and ``rv_s``)."""
    if STATS == RUNNING:
        mean = tl.load(running_mean_ptr + cols * rm_s, mask=col_mask, other=0.0).to(COMPUTE)
        var = tl.load(running_var_ptr + cols * rv_s, mask=col_mask, other=1.0).to(COMPUTE)
        rstd = 1.0 / tl.sqrt(var + scalar(eps_hi, eps_lo, var))
    else:
        mean = tl.load(stats_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
        rstd = tl.load(stats_ptr + C + cols, mask=col_mask, other=0.0).to(COMPUTE)
    return mean, rstd


@triton.jit
def finite_or_zero(value):
    """``value`` where it is finite, else 0: a shift that is inf or NaN would turn every deviation into NaN,
    where the statistics must show an inf as PyTorch's do (mean inf, variance NaN)."""
    return tl.where(value - value == 0.0, value, 0.0)


@triton.jit
def nonnegative(m2):
    """M2 with rounding's small negative values clamped to 0 and NaN kept (``tl.maximum`` would drop it)."""
    return tl.where(m2 < 0.0, 0.0, m2)


@triton.jit
def gathered_stats(moments_ptr, eps_hi, eps_lo, C, cols, col_mask, ranks, BLOCK_C: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """(count, mean, M2, rstd) per channel over a process group, from ``ranks`` ranks' [4, C] moments (count,
    mean head, mean tail, M2: what PHASE == MOMENTS stores), gathered back to back at ``moments_ptr``.

    The parallel-variance merge, with deviations (head_r - shift) + tail_r from the first rank that holds
    values (the ranks before it add nothing, so the shift may wait for it): an empty rank 0 costs no
    precision, and the merge is as precise as one rank's. Rank by rank, each step elementwise per channel, so
    the bits depend on nothing but the moments: forward and backward get the same statistics. A channel that
    no rank holds a value of (count 0: every rank empty) gets finite placeholders, which nothing reads.
    """
    count = tl.zeros([BLOCK_C], dtype=COMPUTE)
    shift = tl.zeros_like(count)
    sum_dev = tl.zeros_like(count)
    sum_sq = tl.zeros_like(count)
    r = 0
    while r < ranks:
        moments = moments_ptr + r * 4 * C + cols
        n = tl.load(moments, mask=col_mask, other=0.0).to(COMPUTE)
        head = tl.load(moments + C, mask=col_mask, other=0.0).to(COMPUTE)
        tail = tl.load(moments + 2 * C, mask=col_mask, other=0.0).to(COMPUTE)
        m2 = tl.load(moments + 3 * C, mask=col_mask, other=0.0).to(COMPUTE)
        shift = tl.where(count == 0.0, finite_or_zero(head), shift)
        deviation = tl.where(n > 0.0, (head - shift) + tail, 0.0)
        count += n
        sum_dev += n * deviation
        sum_sq += m2 + n * deviation * deviation
        r += 1
    count = tl.where(col_mask, count, 1.0)  # channels past C: no 0 / 0 (which the interpreter warns about)
    divisor = tl.where(count > 0.0, count, 1.0)
    offset = sum_dev / divisor
    mean = shift + offset
    m2 = nonnegative(sum_sq - sum_dev * offset)
    rstd = 1.0 / tl.sqrt(m2 / divisor + scalar(eps_hi, eps_lo, mean))
    return count, mean, m2, rstd


@triton.jit
def affine(rstd, weight_ptr, bias_ptr, w_s, b_s, cols, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
           COMPUTE: tl.constexpr):
    """(scale = weight * rstd, bias) of a tile's channels (element strides ``w_s``, ``b_s``); weight 1 and bias 0
    where absent."""
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols * w_s, mask=col_mask, other=0.0).to(COMPUTE)
    bias = tl.zeros_like(rstd)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * b_s, mask=col_mask, other=0.0).to(COMPUTE)
    return scale, bias


@triton.jit
def store_partials(part_ptr, C, num_splits, cols, col_mask, first, second):
    """This split's two per-channel partial results, at [0, split, :] and [1, split, :] of [2, num_splits, C]."""
    out = tl.program_id(1) * C + cols
    tl.store(part_ptr + out, first, mask=col_mask)
    tl.store(part_ptr + num_splits * C + out, second, mask=col_mask)


@triton.jit
def sum_partials(part_ptr, C, cols, col_mask, num_splits, SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                 COMPUTE: tl.constexpr):
    """Totals over the splits of two per-channel partial results ([2, num_splits, C] at ``part_ptr``), added in
    [SPLIT_BLOCK, BLOCK_C] tiles in split order, so every program that adds them gets the same bits. Loads
    bypass L1 (``.cg``): other programs of this launch wrote them (the ticket and persistent variants)."""
    sum_a = tl.zeros([BLOCK_C], dtype=COMPUTE)
    sum_b = tl.zeros([BLOCK_C], dtype=COMPUTE)
    first = 0
    while first < num_splits:
        splits = first + tl.arange(0, SPLIT_BLOCK)
        offsets = splits[:, None] * C + cols[None, :]
        mask = (splits < num_splits)[:, None] & col_mask[None, :]
        sum_a += tl.sum(tl.load(part_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(COMPUTE), axis=0)
        sum_b += tl.sum(tl.load(part_ptr + num_splits * C + offsets, mask=mask, other=0.0,
                                cache_modifier=".cg").to(COMPUTE), axis=0)
        first += SPLIT_BLOCK
    return sum_a, sum_b


@triton.jit
def take_ticket(counters_ptr, num_splits):
    """Whether this program is the last of its channel block to finish its partials (an integer ticket: the
    partials it then reads were all stored before the other programs took theirs). The last program sets
    the ticket back to 0 for the next launch on this stream."""
    tl.debug_barrier()  # every thread of this program has stored its partials
    ticket = counters_ptr + 1 + tl.program_id(0)
    last = tl.atomic_add(ticket, 1, sem="acq_rel") == num_splits - 1
    if last:
        tl.atomic_xchg(ticket, 0, sem="relaxed")
    return last


@triton.jit
def count_batch(counters_ptr, batches_ptr, counted):
    """Called once by each program that finalizes a channel block, after it read num_batches_tracked and took
    ``counted`` (the count with this batch) from it: the last of them to get here stores ``counted``, so every
    finalizer reads the count before this batch, whichever finishes first. An integer ticket in the slot after the
    channel blocks' own, set back to 0 for the next launch."""
    tl.debug_barrier()  # every thread of this program has read the count
    ticket = counters_ptr + 1 + tl.num_programs(0)
    if tl.atomic_add(ticket, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        tl.store(batches_ptr, counted)
        tl.atomic_xchg(ticket, 0, sem="relaxed")


@triton.jit
def grid_barrier(counters_ptr):
    """Wait until every program of the launch arrives (the persistent variant; its launch is cooperative, so
    all programs are resident). The first program adds 2**31 - (programs - 1), the others 1 each: the top
    bit of the counter flips exactly when the last arrives, from whatever value earlier launches left."""
    tl.debug_barrier()
    programs = tl.num_programs(0) * tl.num_programs(1)
    is_first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    # 2**31 + 1 - programs, written so that no constant leaves int32 (the sum wraps where it must, in int32).
    arrive = tl.where(is_first, (2147483647 - programs) + 2, 1).to(tl.int32)
    before = tl.atomic_add(counters_ptr, arrive, sem="release")
    flipped = False
    while not flipped:
        now = tl.atomic_add(counters_ptr, 0, sem="acquire")
        flipped = (before ^ now) < 0
    tl.debug_barrier()
