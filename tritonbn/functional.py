"""``batch_norm_act``: batch norm, optional residual add and activation as one op.

Where the kernels run (``tritonbn.backend.uses_kernels``), a call is validated and planned once per
specialization (shapes, strides, dtypes, devices and options): the plan is cached under those, so a later
call with the same tensors skips both and only allocates and launches. The plan travels to backward on the
autograd context. Everything else runs the PyTorch reference (``tritonbn.reference``), which is also what
PyTorch's own transforms see: under ``torch.func`` transforms, forward-mode AD and ``torch.jit.trace`` the
op is composed of ordinary differentiable, batchable, traceable PyTorch ops, exactly as BN + activation is.
"""

import torch
import torch.autograd.forward_ad as forward_ad

from . import ops, plans, reference
from .backend import cpu_reference, device_uses_kernels, uses_kernels
from .validation import check_activation, check_batch_norm_args, check_eps, check_tensor_types

__all__ = ["BatchNormActFunction", "batch_norm_act", "cpu_reference", "prepare", "run"]


def _composite_only() -> bool:
    """Whether a transform is active that needs the op made of PyTorch ops (see the module docstring)."""
    return (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
            or torch.jit.is_tracing())


def recomputing() -> bool:
    """Whether this forward runs again inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) recomputes a checkpointed forward while autograd's engine
    runs the backward. Such a forward must not update the running statistics a second time
    (pytorch/pytorch#96136). False under torch.compile, which traces the forward once, and on a PyTorch
    without the engine's graph-task query."""
    if torch.compiler.is_compiling() or _current_graph_task_id is None:
        return False
    return _current_graph_task_id() != -1


_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def prepare(input, running_mean, running_var, weight, bias, residual, training, eps, activation, cumulative=False):
    """Check a call's arguments (a clear error, before any state changes) and return its kernel plan, or
    None where the call runs the PyTorch reference or, inside torch.compile, the custom ops. ``cumulative``:
    the running averages' factor will be 1 / num_batches_tracked (``momentum=None``).

    The hot path is a cached plan: its key is built from the tensors' layouts (which also proves they are
    tensors), and a plan is cached only after the checks passed for what the key holds.
    """
    try:
        key = plans.key(input, weight, bias, residual, running_mean, running_var, training, activation, cumulative)
    except AttributeError:  # an argument that is not a tensor: name it
        check_tensor_types(input, running_mean, running_var, weight, bias, residual)
        raise
    if not eps > 0.0:
        check_eps(eps, training)
    if torch.compiler.is_compiling() or not device_uses_kernels(key[3]) or _composite_only():
        check_activation(activation)
        check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training)
        return None
    plan = plans.cached(key)
    if plan is None:  # the checks depend only on what the key holds, so a cached plan was checked already
        check_activation(activation)
        check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training)
        plan = plans.new(key, input, weight, bias, residual, running_mean, running_var, training, activation,
                         cumulative)
    return plan


def run(plan, input, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope,
        residual):
    """The op for arguments ``prepare`` checked, on the path it chose. ``momentum`` is the running averages'
    factor, or for ``momentum=None`` (``prepare(cumulative=True)``) the num_batches_tracked counter whose
    reciprocal is the factor: a tensor, read on the device, so that no host sync and no graph break is needed."""
    if plan is not None:
        return BatchNormActFunction.apply(input, weight, bias, residual,
                                          (plan, running_mean, running_var, momentum, eps, negative_slope))
    if torch.compiler.is_compiling() and uses_kernels(input):  # custom ops: no graph break
        batches, momentum = (momentum, 0.0) if isinstance(momentum, torch.Tensor) else (None, float(momentum))
        return ops.CompiledBatchNormAct.apply(input, weight, bias, residual, running_mean, running_var, batches,
                                              bool(training), momentum, float(eps), activation,
                                              float(negative_slope))
    return reference.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation, negative_slope, residual)


def batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5, *, activation="relu", negative_slope=0.01, residual=None):
    """``act(F.batch_norm(input, ...) + residual)`` in one fused op (the add only if ``residual`` is given).

    Arguments mean what they mean for ``torch.nn.functional.batch_norm``; in training the running
    statistics are updated in place (unbiased variance, ``momentum`` as the averaging factor), except in the
    forward that activation checkpointing recomputes during backward (see ``recomputing``), which leaves them
    as the first forward left them. ``activation`` is one of ``tritonbn.ACTIVATIONS``; ``negative_slope`` is
    leaky_relu's.
    """
    if training and running_mean is not None and recomputing():
        running_mean = running_var = None
    plan = prepare(input, running_mean, running_var, weight, bias, residual, training, eps, activation)
    if plan is not None:
        return BatchNormActFunction.apply(input, weight, bias, residual,
                                          (plan, running_mean, running_var, momentum, eps, negative_slope))
    return run(None, input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
               negative_slope, residual)


class BatchNormActFunction(torch.autograd.Function):
    """Autograd for the kernels. Saves x, the residual and per-channel statistics (the batch's mean and
    rstd, or in eval the running statistics), nothing full-size new: the pre-activation is recomputed in
    backward, which costs no extra pass over memory. The plan knows the mode and the activation.

    Only the tensors that can take a gradient are the Function's inputs; everything else travels in one tuple,
    ``call`` = (plan, running_mean, running_var, momentum, eps, negative_slope): autograd's work per call grows
    with the number of inputs (about 0.3 us each on a CPU), and none of these has a gradient."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, call):
        plan, running_mean, running_var, momentum, eps, negative_slope = call
        output, workspace = plan(input, weight, bias, residual, running_mean, running_var, momentum, eps,
                                 negative_slope)
        # With the identity the pre-activation is never needed, so the residual need not stay alive.
        saved_residual = residual if plan.needs_residual else None
        if workspace is not None:  # training: the workspace begins with the batch's mean and rstd (C-sized,
            ctx.save_for_backward(input, weight, bias, saved_residual)  # kept on ctx: no saved-tensor hooks)
            ctx.stats = workspace
        else:  # eval: saved, so that changing them before backward is caught as for any saved tensor
            ctx.save_for_backward(input, weight, bias, saved_residual, running_mean, running_var)
            ctx.stats = None
        ctx.plan, ctx.eps, ctx.negative_slope = plan, eps, negative_slope
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # create_graph=True (double backward, gradient penalties): the kernels' gradients are not
            # themselves differentiable, so this rare case recomputes them with PyTorch ops that are.
            return _differentiable_backward(ctx, grad_output)
        saved = ctx.saved_tensors
        x, weight, bias, residual = saved[:4]
        running_mean, running_var = saved[4:] if ctx.stats is None else (None, None)
        plan = ctx.plan.backward_plan(grad_output, weight, bias, residual, ctx.needs_input_grad)
        grads = plan(grad_output, x, ctx.stats, weight, bias, residual, running_mean, running_var, ctx.eps,
                     ctx.negative_slope)
        return (*grads, None)


def _differentiable_backward(ctx, grad_output):
    saved = ctx.saved_tensors
    input, weight, bias, residual = saved[:4]
    running_mean, running_var = saved[4:] if ctx.stats is None else (None, None)
    plan = ctx.plan
    # In training the batch statistics depend on the input: recomputed differentiably.
    mean, var = reference.statistics(input, running_mean, running_var, plan.training)
    output = reference.normalize_act(input, mean, torch.rsqrt(var + ctx.eps), weight, bias, plan.activation,
                                     ctx.negative_slope, residual)
    grads = [None, None, None, None]
    # An identity's residual was not saved: its gradient is the output's, unchanged.
    if ctx.needs_input_grad[3] and residual is None:
        grads[3] = grad_output
    operands = (input, weight, bias, residual)
    wanted = [i for i, tensor in enumerate(operands) if ctx.needs_input_grad[i] and tensor is not None]
    computed = torch.autograd.grad(output, [operands[i] for i in wanted], grad_output, create_graph=True)
    for i, grad in zip(wanted, computed):
        grads[i] = grad
    return (*grads, None)
