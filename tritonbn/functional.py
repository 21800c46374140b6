"""``batch_norm_act``: batch norm, optional residual add and activation as one op.

CUDA tensors run the fused Triton kernels through ``BatchNormActFunction``. CPU tensors run the same
kernels under Triton's interpreter when ``TRITON_INTERPRET=1``, otherwise the plain PyTorch reference.
"""

import contextlib
import os

import torch

from . import ops, reference
from .validation import check_activation, check_batch_norm_args

_cpu_reference_forced = False


@contextlib.contextmanager
def cpu_reference():
    """Run CPU tensors through the PyTorch reference even when the Triton interpreter is on.

    The interpreter is exact but slow; a CPU training run (the impact study, say) uses this.
    """
    global _cpu_reference_forced
    previous, _cpu_reference_forced = _cpu_reference_forced, True
    try:
        yield
    finally:
        _cpu_reference_forced = previous


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter, read with the values Triton accepts."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _uses_kernels(x: torch.Tensor) -> bool:
    """Whether ``x`` runs the Triton kernels (compiled on CUDA, interpreted on CPU) or the reference."""
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and interpreter_enabled() and not _cpu_reference_forced


class BatchNormActFunction(torch.autograd.Function):
    """Autograd for the kernels. Saves x, the residual and per-channel mean/rstd, nothing full-size new:
    the pre-activation is recomputed in backward, which costs no extra pass over memory."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                activation, negative_slope):
        from . import kernels

        if training:
            output, mean, rstd = kernels.forward_train(
                input, weight, bias, running_mean, running_var, momentum, eps, activation, negative_slope,
                residual)
        else:
            output, mean, rstd = kernels.forward_eval(
                input, running_mean, running_var, weight, bias, eps, activation, negative_slope, residual)
        # With the identity the pre-activation is never needed, so the residual need not stay alive.
        saved_residual = residual if activation != "identity" else None
        ctx.save_for_backward(input, weight, bias, saved_residual, mean, rstd)
        ctx.training = training
        ctx.eps = eps
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # create_graph=True (double backward, gradient penalties): the kernels' gradients are not
            # themselves differentiable, so this rare case recomputes them with PyTorch ops that are.
            return _differentiable_backward(ctx, grad_output)
        return _fused_backward(ctx, grad_output)


_NON_TENSOR_GRADS = (None,) * 7  # running_mean, running_var, training, momentum, eps, activation, slope


def _fused_backward(ctx, grad_output):
    from . import kernels

    input, weight, bias, residual, mean, rstd = ctx.saved_tensors
    need_input, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
    args = (grad_output, input, mean, rstd, weight, bias, ctx.activation, ctx.negative_slope, residual)
    # The residual's gradient is dz = dy * act'(z): dy itself for the identity, else written by the
    # first pass that computes dz, and then read back instead of recomputed.
    grad_residual = grad_output if need_residual and ctx.activation == "identity" else None
    need_dz = need_residual and grad_residual is None
    sum_dz = sum_dz_xhat = dz = None
    if need_weight or need_bias or (ctx.training and need_input):
        sum_dz, sum_dz_xhat, *written = kernels.backward_reduce(*args, return_dz=need_dz)
        dz = written[0] if need_dz else None
    grad_input = None
    if need_input or (need_dz and dz is None):
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        grad_input, dz = kernels.backward_input(
            *args, sum_dz, sum_dz_xhat, count, ctx.training,
            need_dx=need_input, need_dresidual=need_dz, dz=dz)
    if need_dz:
        grad_residual = dz
    grad_weight = sum_dz_xhat.to(weight.dtype).view_as(weight) if need_weight else None
    grad_bias = sum_dz.to(bias.dtype).view_as(bias) if need_bias else None
    return (grad_input, grad_weight, grad_bias, grad_residual, *_NON_TENSOR_GRADS)


def _differentiable_backward(ctx, grad_output):
    input, weight, bias, residual, mean, rstd = ctx.saved_tensors
    if ctx.training:  # batch statistics depend on the input: recompute them differentiably
        dtype = reference.compute_dtype(input)
        var, mean = torch.var_mean(input.to(dtype), dim=[0] + list(range(2, input.dim())), correction=0)
        rstd = torch.rsqrt(var + ctx.eps)
    output = reference.normalize_act(input, mean, rstd, weight, bias, ctx.activation, ctx.negative_slope,
                                     residual)
    grads = [None, None, None, None]
    # An identity's residual was not saved: its gradient is the output's, unchanged.
    if ctx.needs_input_grad[3] and residual is None:
        grads[3] = grad_output
    operands = (input, weight, bias, residual)
    wanted = [i for i, tensor in enumerate(operands) if ctx.needs_input_grad[i] and tensor is not None]
    computed = torch.autograd.grad(output, [operands[i] for i in wanted], grad_output, create_graph=True)
    for i, grad in zip(wanted, computed):
        grads[i] = grad
    return (*grads, *_NON_TENSOR_GRADS)


def batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5, *, activation="relu", negative_slope=0.01, residual=None):
    """``act(F.batch_norm(input, ...) + residual)`` in one fused op (the add only if ``residual`` is given).

    Arguments mean what they mean for ``torch.nn.functional.batch_norm``; in training the running
    statistics are updated in place (unbiased variance, ``momentum`` as the averaging factor).
    ``activation`` is one of ``tritonbn.ACTIVATIONS``; ``negative_slope`` is leaky_relu's.
    """
    check_activation(activation)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training)
    return batch_norm_act_checked(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                  activation, negative_slope, residual)


def batch_norm_act_checked(input, running_mean, running_var, weight, bias, training, momentum, eps,
                           activation, negative_slope, residual):
    """``batch_norm_act`` for arguments already checked (the modules check before counting a batch)."""
    if _uses_kernels(input):
        if torch.compiler.is_compiling():  # custom ops trace without graph breaks; eager keeps the Function
            return ops.batch_norm_act(input, running_mean, running_var, weight, bias, bool(training),
                                      float(momentum), float(eps), activation, float(negative_slope), residual)
        return BatchNormActFunction.apply(input, weight, bias, residual, running_mean, running_var,
                                          bool(training), float(momentum), float(eps), activation,
                                          float(negative_slope))
    return reference.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation, negative_slope, residual)
