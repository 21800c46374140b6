"""The fused op as torch.library ops, so torch.compile sees it without a graph break.

While torch.compile traces, ``tritonbn.functional`` routes the kernel path through ``CompiledBatchNormAct``,
an autograd Function made of a forward and a backward op: an op that mutates (the forward updates the
running statistics, which ``mutates_args`` declares, so a compiled step updates them once) cannot carry an
autograd formula itself. On a GPU those are the triton ops of ``triton_ops.py``, whose kernels Inductor
launches from its own code. Where the kernels are interpreted (a CPU), Inductor cannot run them: there the
custom ops below, ``tritonbn::forward`` and ``tritonbn::backward``, run the very plans eager calls run, as
opaque ops with fake implementations that promise exactly the strides the kernels produce. Importing this
module registers the custom ops; it imports no Triton until an op runs.
"""

import torch
from torch import Tensor

from .backend import kernels_interpreted
from .plans import plan_for
from .reference import compute_dtype, output_dtype


def _output_like(input: Tensor, dtype: torch.dtype) -> Tensor:
    """A new tensor with the strides the kernels give their outputs for ``input`` (see ``output_layout``)."""
    from .kernels.plan import output_layout

    return input.new_empty_strided(input.shape, output_layout(input.shape, input.stride())[0], dtype=dtype)


@torch.library.custom_op("tritonbn::forward", mutates_args=("running_mean", "running_var", "batches"))
def forward(input: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
            running_mean: Tensor | None, running_var: Tensor | None, batches: Tensor | None, training: bool,
            momentum: float | None, eps: float, activation: str, negative_slope: float) -> tuple[Tensor, Tensor]:
    """(output, stats): the batch's mean and rstd, [2 * C], for backward (empty in eval). ``batches``: a module's
    num_batches_tracked, which counts this batch (and whose count makes the factor where ``momentum`` is None)."""
    plan = plan_for(input, weight, bias, residual, running_mean, running_var, training, activation,
                    counting(batches, momentum))
    output, workspace = plan(input, weight, bias, residual, running_mean, running_var, momentum, eps, negative_slope,
                             batches)
    return output, input.new_empty(0) if workspace is None else workspace[: 2 * input.shape[1]]


@forward.register_fake
def _(input, weight, bias, residual, running_mean, running_var, batches, training, momentum, eps, activation,
      negative_slope):
    stats = input.new_empty(2 * input.shape[1] if training else 0, dtype=compute_dtype(input))
    return _output_like(input, output_dtype(input, residual)), stats


@torch.library.custom_op("tritonbn::backward", mutates_args=())
def backward(grad_output: Tensor, input: Tensor, stats: Tensor, weight: Tensor | None, bias: Tensor | None,
             residual: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None, training: bool,
             eps: float, activation: str, negative_slope: float, needs: list[bool]) -> list[Tensor]:
    """[grad input, grad weight, grad bias, grad residual]; an empty tensor for each gradient not wanted
    (``needs`` says which are), since ops cannot return None. ``stats`` is the forward's second output."""

    plan = plan_for(input, weight, bias, residual, running_mean, running_var, training, activation)
    stats = stats if training else None
    grads = plan.backward_plan(grad_output, weight, bias, residual, tuple(needs), whole_workspace=False)(
        grad_output, input, stats, weight, bias, residual, running_mean, running_var, eps, negative_slope)
    # The identity's residual gradient is grad_output itself: an op may not return an alias of its input.
    return [input.new_empty(0) if grad is None else grad.clone() if grad is grad_output else grad for grad in grads]


@backward.register_fake
def _(grad_output, input, stats, weight, bias, residual, running_mean, running_var, training, eps, activation,
      negative_slope, needs):
    need_input, need_weight, need_bias, need_residual = needs
    return [_output_like(input, input.dtype) if need_input else input.new_empty(0),
            torch.empty_like(weight) if need_weight else input.new_empty(0),
            torch.empty_like(bias) if need_bias else input.new_empty(0),
            _output_like(input, grad_output.dtype) if need_residual else input.new_empty(0)]


def counting(batches: Tensor | None, momentum: float | None) -> int:
    """functional.prepare's ``counting`` of a call with these ``batches`` and ``momentum``."""
    return 0 if batches is None else 1 if momentum is not None else 2


def kernel_ops(input: Tensor):
    """(forward op, backward op) that torch.compile traces for a call on ``input``: where the kernels are
    compiled (a GPU) the triton ops, whose kernels Inductor launches itself; where they run under Triton's
    interpreter (a CPU, or any device with TRITON_INTERPRET set), the custom ops above, which run eager's
    plans: Inductor cannot launch an interpreted kernel."""
    if input.device.type != "cpu" and not kernels_interpreted():
        from . import triton_ops  # noqa: F401  defines the ops; it imports Triton, so only now

        return torch.ops.tritonbn.forward_kernels, torch.ops.tritonbn.backward_kernels
    return torch.ops.tritonbn.forward, torch.ops.tritonbn.backward


class CompiledBatchNormAct(torch.autograd.Function):
    """What ``BatchNormActFunction`` computes, made of a forward and a backward op for torch.compile to trace."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, batches, training, momentum, eps,
                activation, negative_slope):
        forward_op, ctx.backward_op = kernel_ops(input)
        output, stats = forward_op(input, weight, bias, residual, running_mean, running_var, batches, training,
                                   momentum, eps, activation, negative_slope)
        ctx.save_for_backward(input, stats, weight, bias, residual, running_mean, running_var)
        ctx.options = (training, eps, activation, negative_slope)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, stats, weight, bias, residual, running_mean, running_var = ctx.saved_tensors
        training, eps, activation, negative_slope = ctx.options
        needs = [bool(need) and tensor is not None
                 for need, tensor in zip(ctx.needs_input_grad[:4], (input, weight, bias, residual))]
        grads = ctx.backward_op(grad_output, input, stats, weight, bias, residual, running_mean, running_var,
                                training, eps, activation, negative_slope, needs)
        grads = [grad if need else None for grad, need in zip(grads, needs)]
        return (*grads, None, None, None, None, None, None, None, None)
