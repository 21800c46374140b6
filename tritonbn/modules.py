"""``BatchNormAct{1,2,3}d``: drop-in ``nn.BatchNorm{1,2,3}d`` followed by an activation, in one op.

They subclass ``_BatchNorm`` itself, so parameters, buffers, state_dict keys, ``momentum=None``
(cumulative average), ``track_running_stats`` and ``affine`` behave exactly as in PyTorch, and code that
checks ``isinstance(m, _BatchNorm)`` still sees a batch norm. They do not subclass ``nn.BatchNorm2d``:
tools that fold a BatchNorm2d into a convolution would silently drop the activation.

The functions at the end build a batch norm module that shares another one's parameters and buffers:
`fuse`, `unfuse` and `convert_sync_batchnorm` convert modules with them.
"""

import functools
import inspect

from torch import nn
from torch.nn import init
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import _apply, prepare, recomputing, run
from .validation import check_activation

# torch 2.13 added nn.BatchNorm*d(..., *, bias=True); older releases always make a bias when affine.
TORCH_BATCH_NORM_HAS_BIAS_FLAG = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def _state(module):
    """(weight, bias, running_mean, running_var, num_batches_tracked) of a batch norm, read from its
    ``_parameters`` and ``_buffers``: nn.Module.__getattr__, where an ordinary read of them ends, costs about 0.5 us
    a read on a CPU, five reads a call. Where the tables lack one (a parametrization's property provides the
    weight, say), all are read the ordinary way."""
    params, buffers = module._parameters, module._buffers
    try:
        return (params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"],
                buffers["num_batches_tracked"])
    except KeyError:
        return (module.weight, module.bias, module.running_mean, module.running_var,
                getattr(module, "num_batches_tracked", None))


class _BatchNormAct(_BatchNorm):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, activation="relu", negative_slope=0.01):
        check_activation(activation)
        if TORCH_BATCH_NORM_HAS_BIAS_FLAG:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                             dtype=dtype, bias=bias)
        else:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                             dtype=dtype)
            if not bias:
                self.register_parameter("bias", None)
        self.activation = activation
        self.negative_slope = negative_slope

    def reset_parameters(self):
        # As torch 2.13's, which older releases lack: they would initialise a bias of None.
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        # Mirrors _BatchNorm.forward, but checks everything before counting the batch, so a rejected call
        # leaves num_batches_tracked and the running statistics as they were; the op itself counts the batch
        # (the kernels on the device, with no op of its own) and takes momentum=None's factor from the count.
        weight, bias, running_mean, running_var, num_batches_tracked = _state(self)
        training = self.training
        bn_training = training or (running_mean is None and running_var is None)
        batches = None
        if training:
            if not self.track_running_stats:
                running_mean = running_var = None
            elif recomputing():  # activation checkpointing's second forward: no second update
                running_mean = running_var = None
            else:
                batches = num_batches_tracked
        momentum = self.momentum
        counting = 0 if batches is None else 1 if momentum is not None else 2
        plan = prepare(input, running_mean, running_var, weight, bias, residual, bn_training, self.eps,
                       self.activation, counting)
        if plan is not None:
            return _apply(input, weight, bias, residual,
                          (plan, running_mean, running_var, momentum, self.eps, self.negative_slope, batches))
        return run(None, input, running_mean, running_var, weight, bias, bn_training, momentum, self.eps,
                   self.activation, self.negative_slope, residual, batches)

    def extra_repr(self):
        text = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text


class BatchNormAct1d(_BatchNormAct):
    """``nn.BatchNorm1d`` + activation (+ residual add) over (N, C) or (N, C, L) input."""

    def _check_input_dim(self, input):
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNormAct2d(_BatchNormAct):
    """``nn.BatchNorm2d`` + activation (+ residual add) over (N, C, H, W) input."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNormAct3d(_BatchNormAct):
    """``nn.BatchNorm3d`` + activation (+ residual add) over (N, C, D, H, W) input."""

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


# The batch norms `fuse` replaces, and the fused class it replaces each with.
FUSED_CLASS_OF = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d}


def factory_kwargs_of(bn: nn.Module) -> dict:
    """device and dtype for a module replacing batch norm ``bn``."""
    reference = bn.weight if bn.weight is not None else bn.running_mean
    return {} if reference is None else {"device": reference.device, "dtype": reference.dtype}


def share_batch_norm_state(source: nn.Module, target: nn.Module) -> None:
    """Make batch norm ``target`` use the very parameter and buffer objects, and the train/eval mode, of
    ``source`` (optimizers built on ``source`` keep working)."""
    for name in ("weight", "bias"):
        setattr(target, name, getattr(source, name))
    for name, buffer in source._buffers.items():
        setattr(target, name, buffer)
    target.train(source.training)


@functools.cache
def _takes_bias_flag(batch_norm_class: type) -> bool:
    # tritonbn's classes always take ``bias``; torch's from 2.13 on (see TORCH_BATCH_NORM_HAS_BIAS_FLAG).
    return "bias" in inspect.signature(batch_norm_class.__init__).parameters


def batch_norm_like(batch_norm_class: type, bn: nn.Module, **options) -> nn.Module:
    """A ``batch_norm_class`` with the options of batch norm ``bn`` that shares its state (see
    `share_batch_norm_state`); ``options`` are extra constructor arguments."""
    if _takes_bias_flag(batch_norm_class):
        options["bias"] = bn.bias is not None
    module = batch_norm_class(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, **options, **factory_kwargs_of(bn),
    )
    # Without the flag (older torch) the bias of None arrives here, with the other shared tensors.
    share_batch_norm_state(bn, module)
    return module


def fused_like(bn: nn.Module, activation: str, negative_slope: float) -> _BatchNormAct:
    """The BatchNormAct computing ``activation(bn(input))`` for an nn.BatchNorm{1,2,3}d ``bn``, sharing its state."""
    return batch_norm_like(FUSED_CLASS_OF[type(bn)], bn, activation=activation, negative_slope=negative_slope)
