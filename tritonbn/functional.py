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
from .backend import _forced_reference, cpu_reference, device_uses_kernels, uses_kernels
from .validation import check_activation, check_batch_norm_args, check_eps, check_tensor_types

__all__ = ["BatchNormActFunction", "batch_norm_act", "cpu_reference", "prepare", "recomputing", "run"]

# The checks every call makes, as the C functions themselves (torch.jit.is_tracing() is a Python wrapper of the
# second that also asks whether TorchScript is compiling this code, which it never is).
_functorch_transforms_active = torch._C._are_functorch_transforms_active
_jit_tracing = torch._C._is_tracing
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def recomputing() -> bool:
    """Whether this forward runs again inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) recomputes a checkpointed forward while autograd's engine
    runs the backward. Such a forward must not update the running statistics a second time
    (pytorch/pytorch#96136). False while torch.compile traces, whatever the engine is doing: a graph is traced
    once and run by every later call, so an answer taken as a constant there (a graph traced inside a
    reentrant checkpoint's backward) would leave every later training step without its update. torch.compile
    handles checkpointing within its own graphs; a compiled module checkpointed from outside recomputes with
    its graph, which may update again, as nn.BatchNorm does. False too on a PyTorch without the engine's
    graph-task query."""
    if torch.compiler.is_compiling():
        return False
    return _graph_task_id is not None and _graph_task_id() != -1


def prepare(input, running_mean, running_var, weight, bias, residual, training, eps, activation, counting=0):
    """Check a call's arguments (a clear error, before any state changes) and return its kernel plan, or
    None where the call runs the PyTorch reference or, inside torch.compile, the custom ops. ``counting``: 0,
    or a module's training call that counts its batch in num_batches_tracked (1), with momentum=None (2).

    The hot path is a cached plan, found by ``plans.lookup`` (guards that compare the tensors with those the
    plan was made for, which also proves they are tensors): a plan is cached only after the checks passed for
    its tensors' layouts, and only where the kernels run, so a cached plan on a CPU only has to ask whether
    ``cpu_reference()`` is in force.
    """
    if not eps > 0.0:
        check_eps(eps, training)
    if torch.compiler.is_compiling() or _functorch_transforms_active() or forward_ad._current_level >= 0 or \
            _jit_tracing():  # torch.compile's custom ops, or a transform that needs PyTorch ops
        check_activation(activation)
        check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training)
        return None
    try:
        plan = plans.lookup(input, weight, bias, residual, running_mean, running_var, training, activation, counting)
        if plan is not None:
            return None if plan.index is None and _forced_reference.get() else plan
        key = plans.key(input, weight, bias, residual, running_mean, running_var, training, activation, counting)
    except AttributeError:  # an argument that is not a tensor: name it
        check_tensor_types(input, running_mean, running_var, weight, bias, residual)
        raise
    negated = plans.negated(input, weight, bias, residual, running_mean, running_var)  # the reference reads those
    plan = None if negated else plans.PLANS.get(key)
    if plan is not None:  # planned for tensors the guards tell apart from these (say, a Parameter's copy)
        plans.guard(plan, input, weight, bias, residual, running_mean, running_var, training, activation, counting)
        return None if plan.index is None and _forced_reference.get() else plan
    check_activation(activation)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training)
    if device_uses_kernels(key[3]) and not negated:
        return plans.new(key, input, weight, bias, residual, running_mean, running_var, training, activation, counting)
    return None


def run(plan, input, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope,
        residual, batches=None):
    """The op for arguments ``prepare`` checked, on the path it chose. ``batches``: the num_batches_tracked
    counter of a module's training call (``prepare``'s ``counting``), which the op increments; ``momentum`` None
    then makes the running averages' factor 1 / num_batches_tracked, taken on the device (no host sync, no graph
    break). Without ``batches`` a momentum of None is a factor of 0, as in _BatchNorm."""
    if plan is not None:
        return _apply(input, weight, bias, residual,
                      (plan, running_mean, running_var, momentum, eps, negative_slope, batches))
    if batches is None and momentum is None:
        momentum = 0.0
    if torch.compiler.is_compiling() and uses_kernels(input):  # custom ops: no graph break
        return ops.CompiledBatchNormAct.apply(input, weight, bias, residual, running_mean, running_var, batches,
                                              bool(training), None if momentum is None else float(momentum),
                                              float(eps), activation, float(negative_slope))
    return reference.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation, negative_slope, residual, batches)


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
        return _apply(input, weight, bias, residual, (plan, running_mean, running_var, momentum, eps, negative_slope,
                                                      None))
    return run(None, input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
               negative_slope, residual)


class BatchNormActFunction(torch.autograd.Function):
    """Autograd for the kernels. Saves x, the residual and per-channel statistics (in training the forward's
    workspace: the batch's mean and rstd, then rows per split that backward writes its sums into; in eval the
    running statistics), nothing full-size new: the pre-activation is recomputed in backward, which costs no
    extra pass over memory. The plan knows the mode and the activation.

    Only the tensors that can take a gradient are the Function's inputs; everything else travels in one tuple,
    ``call`` = (plan, running_mean, running_var, momentum, eps, negative_slope, batches): autograd's work per call
    grows with the number of inputs (about 0.3 us each on a CPU), and none of these has a gradient."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, call):
        plan, running_mean, running_var, momentum, eps, negative_slope, batches = call
        output, workspace = plan(input, weight, bias, residual, running_mean, running_var, momentum, eps,
                                 negative_slope, batches)
        # With the identity the pre-activation is never needed, so the residual need not stay alive.
        saved_residual = residual if plan.needs_residual else None
        if workspace is not None:  # training: the workspace begins with the batch's mean and rstd (C-sized
            ctx.save_for_backward(input, weight, bias, saved_residual)  # rows, kept on ctx: no saved-tensor hooks)
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
        if grad_output.is_neg():  # a gradient PyTorch negates as it reads it (plans.negated): the kernels read memory
            grad_output = grad_output.resolve_neg()
        saved = ctx.saved_tensors
        x, weight, bias, residual = saved[:4]
        running_mean, running_var = saved[4:] if ctx.stats is None else (None, None)
        forward, needs = ctx.plan, ctx.needs_input_grad
        plan = forward.backward_plans.get((grad_output.stride(), grad_output.dtype, needs)) or \
            forward.backward_plan(grad_output, weight, bias, residual, needs)
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


def _c_apply(function):
    """``function.apply`` without autograd.Function's Python wrapper, which binds default arguments (there are
    none), asks whether functorch transforms are active (``prepare`` asked) and passes every argument through a
    generator that unwraps dead functorch wrappers (there are none where no transform is active): the C++
    ``_FunctionBase.apply`` bound to ``function``. Where this PyTorch lacks it, the ordinary ``apply``."""
    descriptor = getattr(torch._C, "_FunctionBase", type).__dict__.get("apply")
    bound = getattr(descriptor, "__get__", None)
    return function.apply if bound is None else bound(None, function)


_apply = _c_apply(BatchNormActFunction)
