"""The kernels in pieces, for synchronized batch norm, whose statistics and gradient sums are totals over a
process group: each rank computes its local partial results, the module merges them across ranks with
collectives, and the normalise and input-gradient kernels then run on the group's totals (STATS == GIVEN,
SUMS == GIVEN). These calls are not the single-GPU hot path: they launch through Triton's ordinary path.
"""

import torch

from ..activations import KERNEL_IDS
from ..reference import output_dtype
from .activations import IDENTITY
from .backward import backward_input_kernel, backward_reduce_kernel
from .forward import moments_partial_kernel, normalize_kernel
from .plan import Tiling, compute_dtype, ncs_strides, output_layout, spatial_size, split_float, stats_dtype
from .tiles import GIVEN

_NO_STRIDES = (0, 0, 0)


def _addressable(t):
    """``t`` with its (n, c, s) strides; copied to contiguous only when no such strides exist."""
    strides = ncs_strides(t.shape, t.stride())
    if strides is None:
        t = t.contiguous()
        strides = ncs_strides(t.shape, t.stride())
    return t, strides


def _tiling(x, x_ncs):
    R = x.shape[0] * spatial_size(x.shape)
    return R, Tiling(R, x.shape[1], x_ncs[1] == 1, x.device, x.element_size(), 8 if x.dtype == torch.float64 else 4)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and sum of squared deviations (M2) over all but dim 1 of a non-empty ``x``."""
    x, x_ncs = _addressable(x)
    R, tiling = _tiling(x, x_ncs)
    C = x.shape[1]
    workspace = torch.empty((2 + 2 * tiling.num_splits, C), dtype=stats_dtype(x.dtype), device=x.device)
    moments_partial_kernel[tiling.grid](x, workspace, R, C, spatial_size(x.shape), *x_ncs, tiling.rows_per_split,
                                        tiling.block_r, tiling.block_c, tiling.rows_i64, compute_dtype(x.dtype),
                                        num_warps=tiling.num_warps)
    counts = torch.full((tiling.num_splits, 1), float(tiling.rows_per_split), dtype=workspace.dtype, device=x.device)
    counts[-1] = tiling.last_split_rows
    means, m2s = workspace[2:].view(2, tiling.num_splits, C)  # after the [2, C] the normalise kernel would write
    mean = (counts * means).sum(0) / R  # Chan et al.: exact merge of the splits' (count, mean, M2)
    return mean, (m2s + counts * (means - mean).square()).sum(0)


def normalize_act(x, mean, rstd, weight, bias, activation, negative_slope, residual):
    """act((x - mean) * rstd * weight + bias [+ residual]) with given per-channel statistics."""
    x, x_ncs = _addressable(x)
    R, tiling = _tiling(x, x_ncs)
    out_dtype = output_dtype(x, residual)
    y = torch.empty_strided(x.shape, output_layout(x.shape, x.stride())[0], dtype=out_dtype, device=x.device)
    residual, r_ncs = _addressable(residual) if residual is not None else (x, _NO_STRIDES)
    stats = torch.stack([mean, rstd])
    normalize_kernel[tiling.grid](
        x, y, residual, stats, _or(weight, x), _or(bias, x), x, x, 0.0, 0.0, 0.0, 0.0, *split_float(negative_slope),
        R, x.shape[1], spatial_size(x.shape), *x_ncs, *ncs_strides(y.shape, y.stride()), *r_ncs,
        tiling.rows_per_split, 1, 1, 1, GIVEN.value, False, weight is not None, bias is not None,
        r_ncs is not _NO_STRIDES, KERNEL_IDS[activation], 1, tiling.block_r, tiling.block_c, tiling.rows_i64,
        compute_dtype(x.dtype), num_warps=tiling.num_warps)
    return y


def _or(t, dummy):
    return dummy if t is None else t


def _grad_operands(dy, x, residual, activation):
    dy, dy_ncs = _addressable(dy)
    x, x_ncs = _addressable(x)
    if residual is not None and KERNEL_IDS[activation] != IDENTITY.value:
        residual, r_ncs = _addressable(residual)
    else:
        residual, r_ncs = None, _NO_STRIDES
    return dy, dy_ncs, x, x_ncs, residual, r_ncs


def backward_reduce(dy, x, mean, rstd, weight, bias, activation, negative_slope, residual):
    """Per-channel (sum of dz, sum of dz * xhat) of this rank's rows, dz = dy * act'(z)."""
    dy, dy_ncs, x, x_ncs, residual, r_ncs = _grad_operands(dy, x, residual, activation)
    R, tiling = _tiling(x, x_ncs)
    C = x.shape[1]
    partials = torch.empty((2, tiling.num_splits, C), dtype=stats_dtype(x.dtype), device=x.device)
    backward_reduce_kernel[tiling.grid](
        dy, x, _or(residual, x), torch.stack([mean, rstd]), _or(weight, x), _or(bias, x), x, x, partials, x,
        0.0, 0.0, *split_float(negative_slope), R, C, spatial_size(x.shape), *dy_ncs, *x_ncs, *r_ncs,
        *_NO_STRIDES, tiling.rows_per_split, GIVEN.value, weight is not None, bias is not None, residual is not None,
        False, KERNEL_IDS[activation], tiling.block_r, tiling.block_c, tiling.rows_i64, compute_dtype(x.dtype),
        num_warps=tiling.num_warps)
    return partials[0].sum(0), partials[1].sum(0)  # no atomics: deterministic


def backward_input(dy, x, mean, rstd, weight, bias, activation, negative_slope, residual, sum_dz, sum_dz_xhat,
                   count, training=True):
    """(grad input, grad residual) from the group's totals of the sums and its value count per channel;
    with ``training=False`` the statistics were constants and the sums are not used."""
    dy, dy_ncs, x, x_ncs, residual_read, r_ncs = _grad_operands(dy, x, residual, activation)
    R, tiling = _tiling(x, x_ncs)
    dx = torch.empty_like(x)
    dz = torch.empty_like(x, dtype=dy.dtype) if residual is not None else None
    backward_input_kernel[tiling.grid](
        dy, x, _or(residual_read, x), torch.stack([mean, rstd]), _or(weight, x), _or(bias, x), x, x,
        torch.stack([sum_dz, sum_dz_xhat]), dx, _or(dz, x), x, x, 0.0, 0.0, *split_float(negative_slope), count,
        1, R, x.shape[1], spatial_size(x.shape), *dy_ncs, *x_ncs, *r_ncs, *ncs_strides(dx.shape, dx.stride()),
        *(ncs_strides(dz.shape, dz.stride()) if dz is not None else _NO_STRIDES), tiling.rows_per_split,
        GIVEN.value, GIVEN.value, training, weight is not None, bias is not None, residual_read is not None, True,
        dz is not None, False, False, False, KERNEL_IDS[activation], 1, tiling.block_r, tiling.block_c,
        tiling.rows_i64, compute_dtype(x.dtype), num_warps=tiling.num_warps)
    return dx, dz
