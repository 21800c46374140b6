"""The kernels in pieces for SyncBatchNormAct, whose statistics and gradient sums are a process group's: the
module runs one collective between two pieces of each direction.

The pieces, a contract tritonbn/sync/reference.py's PyTorch ops share:
  local_moments  this rank's statistics, to be all-gathered: [4, C] (count, mean head, mean tail, M2) per
                 channel; one launch (PHASE == MOMENTS: the ticket's last program merges the splits)
  normalize      one launch: every program merges the gathered ranks' statistics (STATS == GATHERED), split 0's
                 update the running statistics, and all write act((x - mean) * rstd * weight + bias [+ residual])
  grad_sums      one launch (TICKET): this rank's [2, C] sums of dz and dz * xhat, to be all-reduced, and its
                 weight and bias gradients (local, as nn.SyncBatchNorm's: DistributedDataParallel averages them)
  input_grad     one launch (APPLY): dx from the group's sums, with the group's statistics and count GATHERED
Nothing here reads a device value on the host: the group's count, mean and variance stay on the device, so a
call needs no host sync and a CUDA graph can capture it. An empty rank sends zeros, joining the collectives and
adding nothing, and launches only the running statistics' update (a normalise launch without tiles).

A call's layouts are planned once and cached, as ForwardPlan's are, and every tensor is addressed by its own
strides or read from its contiguous copy (plan.operand_layout, plan.vector_stride). ``launch``, where given,
launches instead of the plan's launchers, as for ForwardPlan (torch.compile's triton ops: tritonbn/sync/ops.py).
"""

import dataclasses

import torch

from ..activations import KERNEL_IDS
from ..plans import static_layout
from ..reference import output_dtype
from .activations import IDENTITY
from .backward import backward_kernel
from .configs import choose
from .forward import forward_kernel
from .launch import Launcher, current_stream, direct_stream, launch_all
from .plan import (
    LAYOUT_NAMES,
    Tiling,
    compute_dtype,
    counters,
    dense_vectors,
    device_index,
    kernel_strides,
    layout_family,
    ncs_strides,
    needs_int64,
    operand_layout,
    output_layout,
    spatial_size,
    split_float,
    stats_dtype,
    vector_stride,
)
from .tiles import APPLY, GATHERED, GIVEN, MOMENTS, TICKET

MOMENT_ROWS = 4  # (count, mean head, mean tail, M2) per channel: what one rank contributes
_PLANS: dict = {}
_MAX_PLANS = 4096


class _Step:
    """One launch on ``tiles`` with the integer and constexpr arguments ``tail``, run apart from a plan's other
    launches (a collective comes between): what ``launch_all`` takes for a plan."""

    def __init__(self, kernel, tiles, tail):
        self.launches = [(Launcher(kernel, tiles.grid, tiles.tiling.num_warps), tail)]
        self.direct_ready = False  # compiled, so a call may pass addresses (launch.launch_all)

    def __call__(self, index, tensors, floats, launch):
        if launch is None:
            launch_all(self, direct_stream(current_stream(index), tensors), tensors, floats)
        else:
            launcher, tail = self.launches[0]
            launch(launcher, (*tensors, *floats, *tail))


class _Tiles:
    """The tiling, kernel strides and tile constexprs of one direction's launches on tensors of ``all_ncs``
    ((n, c, s) strides). Always the ticket variant's tiling: a rank's moments are merged on the rank before they
    travel. An empty rank's launch has no tiles, one split per channel block."""

    def __init__(self, direction, x, all_ncs):
        shape = tuple(x.shape)
        N, C, S = shape[0], shape[1], spatial_size(shape)
        family = layout_family(N, S, all_ncs)
        config = choose(direction, x.dtype, LAYOUT_NAMES[family], N, C, S, x.device)
        self.tiling = tiling = Tiling(dataclasses.replace(config, variant="ticket"), family, N, C, S, x.device)
        self.strides = [step for ncs in all_ncs for step in kernel_strides(tiling.layout, S, ncs)]
        self.strides += [0] * (15 - len(self.strides))  # kernels take 3 (forward) or 5 (backward) tensors' strides
        self.constexprs = tiling.constexprs(needs_int64(shape, all_ncs), compute_dtype(x.dtype))
        self.empty = N * S == 0
        self.grid = (tiling.channel_blocks, 1) if self.empty else tiling.grid
        self.sizes = (0, N, C, S, 1, 0, 1) if self.empty else tiling.sizes(N, C, S)
        self.splits = tiling.num_splits
        self.counter_slots = tiling.channel_blocks + 1


def _counters(plan, launch):
    """Zeroed ticket counters: the stream's own (plan.counters), or this call's own where ``launch`` is given."""
    if launch is not None:
        return torch.zeros(plan.counter_slots, dtype=torch.int32, device=plan.device)
    return counters(plan.device, current_stream(plan.index), plan.counter_slots)


def _cached(make, *tensors, **options):
    """``make(*layouts, **options)`` for the tensors' layouts (``plans.static_layout``: every size an int, as
    torch.compile's fake tensors need), made once per specialization."""
    layouts = tuple(static_layout(t) for t in tensors)
    key = (make, *(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in layouts),
           *sorted(options.items()))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = make(*layouts, **options)
    return plan


def _or(t, dummy):
    return dummy if t is None else t


def _vector_tail(strides):
    return tuple(1 if step is None else step for step in strides)  # None: read through a dense copy


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


class _MomentsPlan:
    def __init__(self, x):
        self.x_ncs, self.copy_input = operand_layout(tuple(x.shape), x.stride())
        tiles = _Tiles("fwd", x, [self.x_ncs])
        self.empty, self.C, self.counter_slots = tiles.empty, x.shape[1], tiles.counter_slots
        self.device, self.index, self.dtype = x.device, device_index(x.device), stats_dtype(x.dtype)
        self.workspace_numel = MOMENT_ROWS * self.C * (1 + tiles.splits)  # the moments, then the partials
        flags = (False, False, False, False, False, False, IDENTITY.value)
        self.step = _Step(forward_kernel, tiles, (*tiles.sizes, tiles.splits, *tiles.strides[:9], 1, 1, 1, 1,
                                                  MOMENTS.value, GIVEN.value, *flags, *tiles.constexprs))


def local_moments(x, launch=None) -> torch.Tensor:
    """This rank's (count, mean head, mean tail, M2) per channel as a flat [4 * C] tensor; zeros for an empty
    rank."""
    plan = _cached(_MomentsPlan, x)
    if plan.empty:
        return torch.zeros(MOMENT_ROWS * plan.C, dtype=plan.dtype, device=plan.device)
    if plan.copy_input:
        x = x.contiguous()
    workspace = torch.empty(plan.workspace_numel, dtype=plan.dtype, device=plan.device)
    plan.step(plan.index, (x, x, x, workspace, _counters(plan, launch), x, x, x, x, x), (0.0,) * 6, launch)
    return workspace[: MOMENT_ROWS * plan.C]


class _NormalizePlan:
    def __init__(self, x, gathered, weight, bias, residual, running_mean, running_var, activation_id, cumulative):
        shape = tuple(x.shape)
        self.shape, self.C = shape, shape[1]
        self.copy_input = operand_layout(shape, x.stride())[1]
        r_ncs, self.copy_residual = operand_layout(shape, residual.stride()) if residual is not None else (None,
                                                                                                            False)
        self.out_stride = output_layout(shape, x.stride())[0]
        self.out_dtype = output_dtype(x, residual)
        self.vector_strides = tuple(map(vector_stride, (weight, bias, running_mean, running_var)))
        self.copy_vectors = None in self.vector_strides
        self.update_running = running_mean is not None
        self.cumulative = cumulative and self.update_running
        all_ncs = [operand_layout(shape, x.stride())[0], ncs_strides(shape, self.out_stride)] + (
            [r_ncs] if r_ncs is not None else [])
        tiles = _Tiles("fwd", x, all_ncs)
        self.device, self.index = x.device, device_index(x.device)
        # An empty rank launches only to update its running statistics, which every rank of the group updates.
        self.launches = not tiles.empty or self.update_running
        ranks = gathered.shape[0] // (MOMENT_ROWS * self.C)
        # The module counts the batch itself (COUNT_BATCHES off): a CUMULATIVE factor reads the count with it.
        flags = (self.update_running, False, self.cumulative, weight is not None, bias is not None, r_ncs is not None,
                 activation_id)
        self.step = _Step(forward_kernel, tiles, (*tiles.sizes, ranks, *tiles.strides[:9],
                                                  *_vector_tail(self.vector_strides), APPLY.value, GATHERED.value,
                                                  *flags, *tiles.constexprs))


def normalize(x, gathered, weight, bias, residual, running_mean, running_var, momentum, eps, activation,
              negative_slope, launch=None) -> torch.Tensor:
    """act((x - mean) * rstd * weight + bias [+ residual]) with the group's statistics, merged from the ranks'
    ``gathered`` moments, and the running statistics moved towards them (where given). ``momentum`` is the
    factor, or the num_batches_tracked counter whose reciprocal is (momentum=None), read on the device."""
    cumulative = isinstance(momentum, torch.Tensor)
    plan = _cached(_NormalizePlan, x, gathered, weight, bias, residual, running_mean, running_var,
                   activation_id=KERNEL_IDS[activation], cumulative=cumulative)
    y = torch.empty_strided(plan.shape, plan.out_stride, dtype=plan.out_dtype, device=plan.device)
    if not plan.launches:
        return y
    if plan.copy_input:
        x = x.contiguous()
    if plan.copy_residual:
        residual = residual.contiguous()
    if plan.copy_vectors:
        targets = running_mean, running_var
        weight, bias, running_mean, running_var = dense_vectors(plan.vector_strides, weight, bias, running_mean,
                                                                running_var)
    batches, momentum = (momentum, 0.0) if plan.cumulative else (x, 0.0 if cumulative else momentum)
    tensors = (x, y, _or(residual, x), gathered, x, _or(weight, x), _or(bias, x), _or(running_mean, x),
               _or(running_var, x), batches)
    plan.step(plan.index, tensors, (*split_float(eps), *split_float(momentum), *split_float(negative_slope)), launch)
    if plan.copy_vectors and plan.update_running:
        for target, updated in zip(targets, (running_mean, running_var)):
            target.copy_(updated)
    return y


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


class _BackwardPlan:
    """Both backward launches of one call's layouts and the gradients wanted, ``needs`` = (input, weight, bias,
    residual): the sums (TICKET) and the input gradient (APPLY), with the all-reduce between them."""

    def __init__(self, dy, x, gathered, weight, bias, residual, activation_id, needs):
        need_input, need_weight, need_bias, need_residual = needs
        shape = tuple(x.shape)
        self.shape, self.C = shape, shape[1]
        identity = activation_id == IDENTITY.value
        dy_ncs, self.copy_dy = operand_layout(shape, dy.stride())
        x_ncs, self.copy_input = operand_layout(shape, x.stride())
        has_residual = residual is not None and not identity  # read only to recompute z
        r_ncs, self.copy_residual = operand_layout(shape, residual.stride()) if has_residual else (x_ncs, False)
        self.dx_stride = output_layout(shape, x.stride())[0]
        self.vector_strides = tuple(map(vector_stride, (weight, bias)))
        self.copy_vectors = None in self.vector_strides
        self.dresidual_is_dy = need_residual and identity
        self.need_dz = need_dz = need_residual and not identity  # dy * act'(z): written by the sums pass
        self.need_input, self.need_weight, self.need_bias = need_input, need_weight, need_bias
        self.dz_dtype, self.dx_dtype = dy.dtype, x.dtype
        self.weight_dtype = None if weight is None else weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        grad_ncs = ncs_strides(shape, self.dx_stride)
        tiles = _Tiles("bwd", x, [dy_ncs, x_ncs, r_ncs, grad_ncs, grad_ncs])
        self.empty, self.counter_slots = tiles.empty, tiles.counter_slots
        self.device, self.index, self.dtype = x.device, device_index(x.device), stats_dtype(x.dtype)
        self.workspace_numel = 2 * self.C * (1 + tiles.splits)  # the totals, then the partials
        ranks = gathered.shape[0] // (MOMENT_ROWS * self.C)
        head = (0, 0, *tiles.sizes, ranks, *tiles.strides, *_vector_tail(self.vector_strides), 1, 1)  # sums at 0
        flags = (True, weight is not None, bias is not None, has_residual)  # TRAINING, HAS_*
        self.sums = _Step(backward_kernel, tiles, (*head, TICKET.value, GATHERED.value, GIVEN.value, *flags,
                                                   need_dz, False, False, need_weight, need_bias, activation_id,
                                                   *tiles.constexprs))
        self.input = _Step(backward_kernel, tiles, (*head, APPLY.value, GATHERED.value, GIVEN.value, *flags, False,
                                                    need_dz, True, False, False, activation_id, *tiles.constexprs))

    def operands(self, dy, x, weight, bias, residual):
        """The call's tensors as the kernels read them (contiguous copies where their layout needs one)."""
        if self.copy_dy:
            dy = dy.contiguous()
        if self.copy_input:
            x = x.contiguous()
        if self.copy_residual:
            residual = residual.contiguous()
        if self.copy_vectors:
            weight, bias = dense_vectors(self.vector_strides, weight, bias)
        return dy, x, weight, bias, residual


def _backward_plan(dy, x, gathered, weight, bias, residual, activation, needs):
    return _cached(_BackwardPlan, dy, x, gathered, weight, bias, residual, activation_id=KERNEL_IDS[activation],
                   needs=tuple(needs))


def grad_sums(dy, x, gathered, weight, bias, residual, eps, activation, negative_slope, needs, launch=None):
    """(this rank's sums [2 * C]: of dz, then of dz * xhat; grad weight; grad bias; dz, the residual's
    gradient), for the gradients ``needs`` asks for (input, weight, bias, residual; None for those not wanted).
    ``gathered``: the ranks' moments the forward gathered."""
    plan = _backward_plan(dy, x, gathered, weight, bias, residual, activation, needs)
    allocate = torch.zeros if plan.empty else torch.empty  # an empty rank's sums and gradients are 0
    dweight = allocate(plan.C, dtype=plan.weight_dtype, device=plan.device) if plan.need_weight else None
    dbias = allocate(plan.C, dtype=plan.bias_dtype, device=plan.device) if plan.need_bias else None
    dz = torch.empty_strided(plan.shape, plan.dx_stride, dtype=plan.dz_dtype, device=plan.device) \
        if plan.need_dz else None
    dresidual = dy if plan.dresidual_is_dy else dz
    if plan.empty:
        return torch.zeros(2 * plan.C, dtype=plan.dtype, device=plan.device), dweight, dbias, dresidual
    dy, x, weight, bias, residual = plan.operands(dy, x, weight, bias, residual)
    sums = torch.empty(plan.workspace_numel, dtype=plan.dtype, device=plan.device)
    tensors = (dy, x, _or(residual, x), gathered, _or(weight, x), _or(bias, x), x, x, sums, _counters(plan, launch),
               _or(dz, x), x, _or(dweight, x), _or(dbias, x))
    plan.sums(plan.index, tensors, (*split_float(eps), *split_float(negative_slope)), launch)
    return sums[: 2 * plan.C], dweight, dbias, dresidual


def input_grad(dy, x, gathered, weight, bias, residual, dresidual, sums, eps, activation, negative_slope, needs,
               launch=None) -> torch.Tensor:
    """The input's gradient from the group's ``sums`` (``grad_sums``'s, all-reduced), reading the dz that
    ``grad_sums`` wrote as the residual's gradient (``dresidual``) where it wrote one."""
    plan = _backward_plan(dy, x, gathered, weight, bias, residual, activation, needs)
    dx = torch.empty_strided(plan.shape, plan.dx_stride, dtype=plan.dx_dtype, device=plan.device)
    if plan.empty:
        return dx
    dy, x, weight, bias, residual = plan.operands(dy, x, weight, bias, residual)
    tensors = (dy, x, _or(residual, x), gathered, _or(weight, x), _or(bias, x), x, x, sums, x,
               dresidual if plan.need_dz else x, dx, x, x)
    plan.input(plan.index, tensors, (*split_float(eps), *split_float(negative_slope)), launch)
    return dx
