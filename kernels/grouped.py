"""The kernels in pieces, for synchronized batch norm, whose statistics and gradient sums are totals over a
process group: each rank computes its local partial results (PHASE == PARTIALS), the module merges them
across ranks with collectives, and the normalise and input-gradient passes then run on the group's totals
(PHASE == APPLY with the statistics and sums GIVEN). These calls are not the single-GPU hot path: they
launch through Triton's ordinary path.
"""

import torch

from ..activations import KERNEL_IDS
from ..reference import output_dtype
from .activations import IDENTITY
from .backward import backward_kernel
from .configs import choose
from .forward import forward_kernel
from .plan import (
    LAYOUT_NAMES,
    Tiling,
    compute_dtype,
    kernel_strides,
    layout_family,
    ncs_strides,
    needs_int64,
    output_layout,
    spatial_size,
    split_float,
    stats_dtype,
)
from .tiles import APPLY, GIVEN, PARTIALS

_UNUSED = (0, 0, 0)
_VECTORS = (1, 1, 1, 1)  # element strides of weight, bias and the running statistics: dense here


def _addressable(t):
    """``t`` with its (n, c, s) strides; copied to contiguous only when no such strides exist."""
    strides = ncs_strides(t.shape, t.stride())
    if strides is None:
        t = t.contiguous()
        strides = ncs_strides(t.shape, t.stride())
    return t, strides


class _Launch:
    """The tiling, kernel strides and tile constexprs of one call on ``tensors`` (their (n, c, s) strides)."""

    def __init__(self, direction, x, all_ncs):
        shape = x.shape
        self.N, self.C, self.S = shape[0], shape[1], spatial_size(shape)
        family = layout_family(self.N, self.S, all_ncs)
        config = choose(direction, x.dtype, LAYOUT_NAMES[family], self.N, self.C, self.S, x.device)
        self.tiling = Tiling(config, family, self.N, self.C, self.S, x.device)
        self.strides = [s for ncs in all_ncs for s in kernel_strides(self.tiling.layout, self.S, ncs)]
        self.tile = self.tiling.constexprs(needs_int64(shape, all_ncs), compute_dtype(x.dtype))

    def head(self):
        return (*self.tiling.sizes(self.N, self.C, self.S), self.tiling.num_splits)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and sum of squared deviations (M2) over all but dim 1 of a non-empty ``x``."""
    x, x_ncs = _addressable(x)
    run = _Launch("fwd", x, [x_ncs])
    C, splits = run.C, run.tiling.num_splits
    workspace = torch.empty(2 * C + 4 * splits * C, dtype=stats_dtype(x.dtype), device=x.device)
    forward_kernel[run.tiling.grid](
        x, x, x, workspace, x, x, x, x, x, x, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, *run.head(), *run.strides, *_UNUSED,
        *_UNUSED, *_VECTORS, PARTIALS.value, GIVEN.value, False, False, False, False, False, 0, *run.tile,
        num_warps=run.tiling.num_warps)
    counts, heads, tails, m2s = workspace[2 * C:].double().view(4, splits, C)
    means = heads + tails
    mean = (counts * means).sum(0) / counts.sum(0)  # Chan et al.: exact merge of the splits' (count, mean, M2)
    return mean.to(workspace.dtype), (m2s + counts * (means - mean).square()).sum(0).to(workspace.dtype)


def normalize_act(x, mean, rstd, weight, bias, activation, negative_slope, residual):
    """act((x - mean) * rstd * weight + bias [+ residual]) with given per-channel statistics."""
    x, x_ncs = _addressable(x)
    y = torch.empty_strided(x.shape, output_layout(x.shape, x.stride())[0], dtype=output_dtype(x, residual),
                            device=x.device)
    residual, r_ncs = _addressable(residual) if residual is not None else (x, None)
    all_ncs = [x_ncs, ncs_strides(y.shape, y.stride())] + ([r_ncs] if r_ncs is not None else [])
    run = _Launch("fwd", x, all_ncs)
    strides = run.strides + list(_UNUSED) * (3 - len(all_ncs))
    forward_kernel[run.tiling.grid](
        x, y, residual, torch.stack([mean, rstd]), x, _or(weight, x), _or(bias, x), x, x, x, 0.0, 0.0, 0.0, 0.0,
        *split_float(negative_slope), *run.head(), *strides, *_VECTORS, APPLY.value, GIVEN.value, False, False,
        weight is not None,
        bias is not None, r_ncs is not None, KERNEL_IDS[activation], *run.tile, num_warps=run.tiling.num_warps)
    return y


def _or(t, dummy):
    return dummy if t is None else t


def _grad_operands(dy, x, residual, activation):
    """(dy, x, residual to read or None, their (n, c, s) strides); the identity needs no residual."""
    dy, dy_ncs = _addressable(dy)
    x, x_ncs = _addressable(x)
    if residual is not None and KERNEL_IDS[activation] != IDENTITY.value:
        residual, r_ncs = _addressable(residual)
        return dy, x, residual, [dy_ncs, x_ncs, r_ncs]
    return dy, x, None, [dy_ncs, x_ncs, x_ncs]


def backward_reduce(dy, x, mean, rstd, weight, bias, activation, negative_slope, residual):
    """Per-channel (sum of dz, sum of dz * xhat) of this rank's rows, dz = dy * act'(z)."""
    dy, x, residual, all_ncs = _grad_operands(dy, x, residual, activation)
    run = _Launch("bwd", x, all_ncs)
    C, splits = run.C, run.tiling.num_splits
    sums = torch.empty(2 * C + 2 * splits * C, dtype=stats_dtype(x.dtype), device=x.device)
    backward_kernel[run.tiling.grid](
        dy, x, _or(residual, x), torch.stack([mean, rstd]), _or(weight, x), _or(bias, x), x, x, sums, x, x, x, x, x,
        0.0, 0.0, *split_float(negative_slope), run.N * run.S, *run.head(), *run.strides, *_UNUSED, *_UNUSED,
        *_VECTORS, PARTIALS.value, GIVEN.value, GIVEN.value, True, weight is not None, bias is not None,
        residual is not None, False, False, False, False, False, KERNEL_IDS[activation], *run.tile,
        num_warps=run.tiling.num_warps)
    partials = sums[2 * C:].view(2, splits, C)
    return partials[0].sum(0), partials[1].sum(0)  # no atomics: deterministic


def backward_input(dy, x, mean, rstd, weight, bias, activation, negative_slope, residual, sum_dz, sum_dz_xhat,
                   count, training=True):
    """(grad input, grad residual) from the group's totals of the sums and its value count per channel;
    with ``training=False`` the statistics were constants and the sums are not used."""
    dy, x, residual_read, all_ncs = _grad_operands(dy, x, residual, activation)
    dx = torch.empty_like(x)
    dz = torch.empty_like(x, dtype=dy.dtype) if residual is not None else None
    grad_ncs = ncs_strides(dx.shape, dx.stride())
    run = _Launch("bwd", x, all_ncs + [grad_ncs])
    grad_strides = run.strides[-3:]
    backward_kernel[run.tiling.grid](
        dy, x, _or(residual_read, x), torch.stack([mean, rstd]), _or(weight, x), _or(bias, x), x, x,
        torch.stack([sum_dz, sum_dz_xhat]), x, _or(dz, x), dx, x, x, 0.0, 0.0, *split_float(negative_slope), count,
        *run.head(), *run.strides[:9], *grad_strides, *grad_strides, *_VECTORS, APPLY.value, GIVEN.value, GIVEN.value,
        training, weight is not None, bias is not None, residual_read is not None, dz is not None, False, True, False,
        False, KERNEL_IDS[activation], *run.tile, num_warps=run.tiling.num_warps)
    return dx, dz
