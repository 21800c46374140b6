"""``BatchNormAct{1,2,3}d``: drop-in ``nn.BatchNorm{1,2,3}d`` followed by an activation, in one op.

They subclass ``_BatchNorm`` itself, so parameters, buffers, state_dict keys, ``momentum=None``
(cumulative average), ``track_running_stats`` and ``affine`` behave exactly as in PyTorch, and code that
checks ``isinstance(m, _BatchNorm)`` still sees a batch norm. They do not subclass ``nn.BatchNorm2d``:
tools that fold a BatchNorm2d into a convolution would silently drop the activation.
"""

import inspect

from torch.nn import init
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import prepare, run
from .validation import check_activation

# torch 2.13 added nn.BatchNorm*d(..., *, bias=True); older releases always make a bias when affine.
TORCH_BATCH_NORM_HAS_BIAS_FLAG = "bias" in inspect.signature(_BatchNorm.__init__).parameters


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
        # leaves num_batches_tracked and the running statistics as they were.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running_stats = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running_stats else None
        running_var = self.running_var if use_running_stats else None
        plan = prepare(input, running_mean, running_var, self.weight, self.bias, residual, bn_training, self.eps,
                       self.activation)

        counts_batches = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if counts_batches:
            self.num_batches_tracked.add_(1)
        average_factor = self._average_factor(counts_batches, batches_before=0)
        return run(plan, input, running_mean, running_var, self.weight, self.bias, bn_training, average_factor,
                   self.eps, self.activation, self.negative_slope, residual)

    def _average_factor(self, counts_batches: bool, batches_before: int) -> float:
        """The running averages' factor: ``momentum``, or with ``momentum=None`` the cumulative average's
        1 / batches (``num_batches_tracked`` + ``batches_before``), as _BatchNorm computes it."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / (float(self.num_batches_tracked) + batches_before) if counts_batches else 0.0

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
