"""Triton kernels for fused batch norm + activation, and the plain launchers that run them.

Kernels know nothing about autograd or modules: ``tritonbn.functional`` builds on these launchers.
"""

from .activations import ACTIVATION_IDS
from .batch_norm_act import (
    as_addressable,
    backward_input,
    backward_reduce,
    channel_moments,
    forward_eval,
    forward_train,
    normalize_act,
)

__all__ = [
    "ACTIVATION_IDS",
    "as_addressable",
    "backward_input",
    "backward_reduce",
    "channel_moments",
    "forward_eval",
    "forward_train",
    "normalize_act",
]
