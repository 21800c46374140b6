"""SyncBatchNormAct's kernel pieces as ``torch.library.triton_op``s, for torch.compile on a GPU: Inductor copies
the kernels into the code it generates and launches them itself, as it does the single-GPU op's
(tritonbn/triton_ops.py). Each body runs tritonbn.kernels.grouped's piece with every launch handed to
``wrap_triton`` (the ticket counters then zeroed per call). This module imports Triton: ops.py imports it the
first time torch.compile traces a synchronized call on a GPU.
"""

from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..kernels import grouped
from .ops import OpPieces


def _launch(launcher, args):
    wrap_triton(launcher.kernel)[launcher.grid](*args, **launcher.options)


@triton_op("tritonbn::sync_moments_kernels", mutates_args=())
def moments(input: Tensor) -> Tensor:
    return grouped.local_moments(input, launch=_launch)


@triton_op("tritonbn::sync_normalize_kernels", mutates_args=("running_mean", "running_var"))
def normalize(input: Tensor, gathered: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
              running_mean: Tensor | None, running_var: Tensor | None, batches: Tensor | None, momentum: float,
              eps: float, activation: str, negative_slope: float) -> Tensor:
    return grouped.normalize(input, gathered, weight, bias, residual, running_mean, running_var,
                             momentum if batches is None else batches, eps, activation, negative_slope, launch=_launch)


@triton_op("tritonbn::sync_grad_sums_kernels", mutates_args=())
def grad_sums(grad_output: Tensor, input: Tensor, gathered: Tensor, weight: Tensor | None, bias: Tensor | None,
              residual: Tensor | None, eps: float, activation: str, negative_slope: float,
              needs: list[bool]) -> list[Tensor]:
    grads = grouped.grad_sums(grad_output, input, gathered, weight, bias, residual, eps, activation, negative_slope,
                              needs, launch=_launch)
    # An op may not return its input: the identity's residual gradient, grad_output itself, as a copy.
    return [input.new_empty(0) if grad is None else grad.clone() if grad is grad_output else grad for grad in grads]


@triton_op("tritonbn::sync_input_grad_kernels", mutates_args=())
def input_grad(grad_output: Tensor, input: Tensor, gathered: Tensor, weight: Tensor | None, bias: Tensor | None,
               residual: Tensor | None, grad_residual: Tensor | None, sums: Tensor, eps: float, activation: str,
               negative_slope: float, needs: list[bool]) -> Tensor:
    return grouped.input_grad(grad_output, input, gathered, weight, bias, residual, grad_residual, sums, eps,
                              activation, negative_slope, needs, launch=_launch)


TRITON_OPS = OpPieces(moments, normalize, grad_sums, input_grad)
