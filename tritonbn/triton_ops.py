"""The fused op as ``torch.library.triton_op``s, for torch.compile on a GPU: Inductor copies the kernels into the
code it generates and launches them from its own wrapper, so a compiled step pays no Python per call.

``tritonbn::forward_kernels`` updates the running statistics in its first kernel (``mutates_args``) and so
cannot carry an autograd formula: ``ops.CompiledBatchNormAct`` wraps it and ``tritonbn::backward_kernels``.
Each body runs while torch.compile traces, on fake tensors: it plans from the tensors' layouts with every
size made a plain int (so ``dynamic=True`` specializes the plan on the shape, as Dynamo then guards it, and
the plan cache is never keyed on a SymInt), allocates with torch ops (the ticket counters too, zeroed per call,
where eager keeps one zeroed buffer per stream), and launches through ``wrap_triton`` with every argument
explicit. No launch is cooperative here (Inductor launches user kernels the ordinary way), so a plan whose
table entry is the persistent variant runs its two halves as two launches.

This module imports Triton: ``ops`` imports it the first time torch.compile traces a call on a GPU.
"""

from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import kernels, plans  # noqa: F401  the kernels defined now, not inside the fake mode op bodies run in
from .ops import counting


def _launch(launcher, args):
    wrap_triton(launcher.kernel)[launcher.grid](*args, **launcher.options)


@triton_op("tritonbn::forward_kernels", mutates_args=("running_mean", "running_var", "batches"))
def forward_kernels(input: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                    running_mean: Tensor | None, running_var: Tensor | None, batches: Tensor | None, training: bool,
                    momentum: float | None, eps: float, activation: str, negative_slope: float
                    ) -> tuple[Tensor, Tensor]:
    """(output, stats): the batch's mean and rstd, [2 * C], for backward (empty in eval); ``batches`` as for
    ``tritonbn::forward``."""
    plan = plans.traced_plan(input, weight, bias, residual, running_mean, running_var, training, activation,
                             counting(batches, momentum))
    output, workspace = plan(input, weight, bias, residual, running_mean, running_var, momentum, eps, negative_slope,
                             batches, launch=_launch)
    return output, input.new_empty(0) if workspace is None else workspace[: 2 * input.shape[1]]


@triton_op("tritonbn::backward_kernels", mutates_args=())
def backward_kernels(grad_output: Tensor, input: Tensor, stats: Tensor, weight: Tensor | None, bias: Tensor | None,
                     residual: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                     eps: float, activation: str, negative_slope: float, needs: list[bool]) -> list[Tensor]:
    """[grad input, grad weight, grad bias, grad residual]; an empty tensor for each gradient not wanted."""
    plan = plans.traced_plan(input, weight, bias, residual, running_mean, running_var, training, activation)
    layouts = [plans.static_layout(t) for t in (grad_output, weight, bias, residual)]
    backward = plan.backward_plan(*layouts, tuple(needs), whole_workspace=False)
    grads = backward(grad_output, input, stats if training else None, weight, bias, residual, running_mean,
                     running_var, eps, negative_slope, launch=_launch)
    # The identity's residual gradient is grad_output itself: an op may not return an alias of its input.
    return [input.new_empty(0) if grad is None else grad.clone() if grad is grad_output else grad for grad in grads]
