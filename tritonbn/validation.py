"""Input checks shared by the functional API and the modules.

Every check runs before anything is computed or updated, so a rejected call changes no state. Where
PyTorch raises RuntimeError for the same mistake, the error class also derives from RuntimeError, so code
written against ``nn.BatchNorm`` keeps catching it.
"""

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS


class ChannelMismatchError(ValueError, RuntimeError):
    """A per-channel tensor (or the residual) does not match the input's shape."""


class DeviceMismatchError(ValueError, RuntimeError):
    """Tensors of one call live on different devices."""


class InputDtypeError(TypeError, NotImplementedError):
    """The input, a parameter or the residual is not a floating-point tensor (PyTorch: NotImplementedError)."""


class InputRankError(ValueError, RuntimeError):
    """The input has fewer than two dims (N, C)."""


class MissingRunningStatsError(ValueError, RuntimeError):
    """Eval mode without running statistics to normalise with."""


# The dtypes the kernels (and PyTorch's batch norm) compute in; float8 and the like are rejected as PyTorch does.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor_types(input, running_mean, running_var, weight, bias, residual) -> None:
    """A TypeError naming the argument for anything that is neither a tensor nor None (input: a tensor)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    optional = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias,
                "residual": residual}
    for name, value in optional.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")


@functools.lru_cache(maxsize=64)
def _torch_eps_error(eps: float, training: bool):
    """(exception class, message) that this PyTorch's F.batch_norm raises for ``eps``, or None if it accepts it.

    Learnt from PyTorch itself on a tiny tensor, once per value: releases differ in what they reject (2.11
    also rejects eps == 0 in eval) and in the words ("... positive during training ..." from 2.13 on).
    """
    x = torch.linspace(-1.0, 1.0, 4).reshape(2, 2)
    try:
        F.batch_norm(x, torch.zeros(2), torch.ones(2), training=training, eps=eps)
    except Exception as error:  # whatever PyTorch raises, raised again as it is
        return type(error), str(error)
    return None


def check_eps(eps, training) -> None:
    """For a non-positive eps, the error this PyTorch's batch norm raises, if it raises one."""
    if eps > 0.0:
        return
    error = _torch_eps_error(float(eps), bool(training))
    if error is not None:
        error_class, message = error
        raise error_class(message)


def check_activation(activation: str) -> str:
    """``activation`` if it is supported, else a ValueError that lists the supported names."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of: {', '.join(ACTIVATIONS)}")
    return activation


@contextlib.contextmanager
def _sizes_as_ints():
    """torch.jit.trace hands out sizes as tensors, to record what is computed from them. The checks are no part
    of the traced computation: they run once, on the example's sizes, with the tracer paused."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training, *,
                          check_batch_size=True):
    """Raise a clear error for anything ``batch_norm_act`` cannot compute; return nothing.

    ``check_batch_size=False`` skips the "more than 1 value per channel" check, for synchronized batch
    norm, whose statistics are over the whole process group rather than this rank's batch.
    """
    if torch.jit.is_tracing():
        with _sizes_as_ints():
            return check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training,
                                         check_batch_size=check_batch_size)
    check_tensor_types(input, running_mean, running_var, weight, bias, residual)
    if input.dtype not in FLOAT_DTYPES:
        raise InputDtypeError(f'"batch_norm" not implemented for {input.dtype}: the input must be one of '
                              f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
    if input.dim() < 2:
        raise InputRankError(f"expected an input of at least 2 dims (N, C, ...), got {input.dim()}D input")
    channels = input.shape[1]
    per_channel = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for name, tensor in per_channel.items():
        if tensor is None:
            continue
        if tensor.device != input.device:
            raise DeviceMismatchError(f"{name} is on {tensor.device} but the input is on {input.device}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise InputDtypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {tensor.dtype}")
        if tensor.numel() != channels:
            raise ChannelMismatchError(
                f"{name} has {tensor.numel()} elements but the input has {channels} channels (dim 1)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both be None)")
    if not training and running_mean is None:
        raise MissingRunningStatsError(
            "running_mean and running_var must be given when training=False (eval mode)")
    if residual is not None:
        if residual.device != input.device:
            raise DeviceMismatchError(f"residual is on {residual.device} but the input is on {input.device}")
        if residual.shape != input.shape:
            raise ChannelMismatchError(
                f"residual has shape {tuple(residual.shape)} but the input has shape {tuple(input.shape)}")
        if residual.dtype not in FLOAT_DTYPES:
            raise InputDtypeError(f"residual must be float16, bfloat16, float32 or float64, got dtype {residual.dtype}")
    if training and check_batch_size and input.shape[0] * math.prod(input.shape[2:]) == 1:
        # Same words as PyTorch, which tools and tests match on.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
