"""Input checks shared by the functional API and the modules.

Every check runs before anything is computed or updated, so a rejected call changes no state. Where
PyTorch raises RuntimeError for the same mistake, the error class also derives from RuntimeError, so code
written against ``nn.BatchNorm`` keeps catching it.
"""

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


@functools.cache
def _torch_checks_eps() -> bool:
    """Whether this PyTorch's F.batch_norm rejects a non-positive eps (2.13 does; older releases give NaN)."""
    try:
        F.batch_norm(torch.ones(2, 1), None, None, training=True, eps=0.0)
    except ValueError:
        return True
    return False


def check_eps(eps, training) -> None:
    """PyTorch's ValueError for eps <= 0 in training or eps < 0 in eval, where this PyTorch raises it."""
    if eps > 0.0 or not _torch_checks_eps():
        return
    if training:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_activation(activation: str) -> str:
    """``activation`` if it is supported, else a ValueError that lists the supported names."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of: {', '.join(ACTIVATIONS)}")
    return activation


def check_batch_norm_args(input, running_mean, running_var, weight, bias, residual, training, *,
                          check_batch_size=True):
    """Raise a clear error for anything ``batch_norm_act`` cannot compute; return nothing.

    ``check_batch_size=False`` skips the "more than 1 value per channel" check, for synchronized batch
    norm, whose statistics are over the whole process group rather than this rank's batch.
    """
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
