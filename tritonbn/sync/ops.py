"""SyncBatchNormAct's kernel pieces as torch.library ops, so that torch.compile traces a synchronized step whole:
the collectives between them are functional collectives, ops of the same graph.

As for the single-GPU op (tritonbn/ops.py): where the kernels are interpreted (a CPU), custom ops run
tritonbn.kernels.grouped's pieces as eager calls do, with fake implementations that promise the strides and
dtypes the kernels produce; where they are compiled (a GPU), triton ops (triton_ops.py), whose kernels Inductor
launches from its own code. ``tritonbn::sync_normalize`` mutates the running statistics, declared so a
compiled step updates them once. Importing this module registers the custom ops; it imports no Triton.
"""

import torch
from torch import Tensor

from ..backend import kernels_interpreted
from ..reference import compute_dtype, output_dtype

_MOMENT_ROWS = 4  # tritonbn.kernels.grouped.MOMENT_ROWS, without importing Triton here


def _like_output(input: Tensor, dtype: torch.dtype) -> Tensor:
    """A new tensor with the strides the kernels give their outputs for ``input`` (see plan.output_layout)."""
    from ..kernels.plan import output_layout

    return input.new_empty_strided(input.shape, output_layout(input.shape, input.stride())[0], dtype=dtype)


def _grouped():
    from ..kernels import grouped

    return grouped


@torch.library.custom_op("tritonbn::sync_moments", mutates_args=())
def moments(input: Tensor) -> Tensor:
    """This rank's [4 * C] moments (grouped.local_moments)."""
    return _grouped().local_moments(input)


@moments.register_fake
def _(input):
    return input.new_empty(_MOMENT_ROWS * input.shape[1], dtype=compute_dtype(input))


@torch.library.custom_op("tritonbn::sync_normalize", mutates_args=("running_mean", "running_var"))
def normalize(input: Tensor, gathered: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
              running_mean: Tensor | None, running_var: Tensor | None, batches: Tensor | None, momentum: float,
              eps: float, activation: str, negative_slope: float) -> Tensor:
    """grouped.normalize; ``batches``: the num_batches_tracked counter whose reciprocal is the running averages'
    factor (momentum=None), or None."""
    return _grouped().normalize(input, gathered, weight, bias, residual, running_mean, running_var,
                                momentum if batches is None else batches, eps, activation, negative_slope)


@normalize.register_fake
def _(input, gathered, weight, bias, residual, running_mean, running_var, batches, momentum, eps, activation,
      negative_slope):
    return _like_output(input, output_dtype(input, residual))


@torch.library.custom_op("tritonbn::sync_grad_sums", mutates_args=())
def grad_sums(grad_output: Tensor, input: Tensor, gathered: Tensor, weight: Tensor | None, bias: Tensor | None,
              residual: Tensor | None, eps: float, activation: str, negative_slope: float,
              needs: list[bool]) -> list[Tensor]:
    """[sums, grad weight, grad bias, grad residual] (grouped.grad_sums), an empty tensor for a gradient not
    wanted; the identity's residual gradient, grad_output itself, as a copy (an op may not return its input)."""
    grads = _grouped().grad_sums(grad_output, input, gathered, weight, bias, residual, eps, activation,
                                 negative_slope, needs)
    return [input.new_empty(0) if grad is None else grad.clone() if grad is grad_output else grad for grad in grads]


@grad_sums.register_fake
def _(grad_output, input, gathered, weight, bias, residual, eps, activation, negative_slope, needs):
    return [input.new_empty(2 * input.shape[1], dtype=compute_dtype(input)),
            torch.empty_like(weight) if needs[1] else input.new_empty(0),
            torch.empty_like(bias) if needs[2] else input.new_empty(0),
            _like_output(input, grad_output.dtype) if needs[3] else input.new_empty(0)]


@torch.library.custom_op("tritonbn::sync_input_grad", mutates_args=())
def input_grad(grad_output: Tensor, input: Tensor, gathered: Tensor, weight: Tensor | None, bias: Tensor | None,
               residual: Tensor | None, grad_residual: Tensor | None, sums: Tensor, eps: float, activation: str,
               negative_slope: float, needs: list[bool]) -> Tensor:
    """grouped.input_grad."""
    return _grouped().input_grad(grad_output, input, gathered, weight, bias, residual, grad_residual, sums, eps,
                                 activation, negative_slope, needs)


@input_grad.register_fake
def _(grad_output, input, gathered, weight, bias, residual, grad_residual, sums, eps, activation, negative_slope,
      needs):
    return _like_output(input, input.dtype)


class OpPieces:
    """The pieces (tritonbn.kernels.grouped's contract) called through four ops: the custom ops above, or the
    triton ops of triton_ops.py."""

    def __init__(self, moments, normalize, grad_sums, input_grad):
        self.ops = moments, normalize, grad_sums, input_grad

    def local_moments(self, input):
        return self.ops[0](input)

    def normalize(self, input, gathered, weight, bias, residual, running_mean, running_var, momentum, eps, activation,
                  negative_slope):
        batches, momentum = (momentum, 0.0) if isinstance(momentum, Tensor) else (None, float(momentum))
        return self.ops[1](input, gathered, weight, bias, residual, running_mean, running_var, batches, momentum,
                           float(eps), activation, float(negative_slope))

    def grad_sums(self, grad_output, input, gathered, weight, bias, residual, eps, activation, negative_slope, needs):
        sums, *grads = self.ops[2](grad_output, input, gathered, weight, bias, residual, float(eps), activation,
                                   float(negative_slope), list(needs))
        return sums, *(grad if need else None for grad, need in zip(grads, needs[1:]))

    def input_grad(self, grad_output, input, gathered, weight, bias, residual, grad_residual, sums, eps, activation,
                   negative_slope, needs):
        return self.ops[3](grad_output, input, gathered, weight, bias, residual, grad_residual, sums, float(eps),
                           activation, float(negative_slope), list(needs))


CUSTOM_OPS = OpPieces(moments, normalize, grad_sums, input_grad)


def pieces(input: Tensor) -> OpPieces:
    """The ops torch.compile traces for a call on ``input``: the triton ops where the kernels are compiled (a
    GPU), the custom ops where they are interpreted (Inductor cannot launch an interpreted kernel)."""
    if input.device.type != "cpu" and not kernels_interpreted():
        from . import triton_ops

        return triton_ops.TRITON_OPS
    return CUSTOM_OPS
