"""The activations tritonbn fuses: one registry that every list in the package is derived from.

Adding an activation means one entry here and its branch in ``kernels/activations.py`` (forward and
derivative under its kernel id). Validation, the PyTorch reference, ``fuse``/``unfuse`` and the perf
harness read this table.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_SLOPE = 0.01  # leaky_relu's negative slope, where none is given


def _default(get) -> float:
    return DEFAULT_SLOPE


@dataclass(frozen=True)
class Activation:
    """One activation the kernels implement.

    ``settings(get)`` reads the settings of a module (``get`` = its attributes) or of a functional call
    (``get`` = its arguments by position or name): it returns the negative slope to fuse with (the default
    for activations without one), or None when the settings are not what the kernels compute (an ELU with
    alpha 2, a tanh-approximated GELU), which fuse() then leaves alone.
    """

    name: str
    kernel_id: int  # the ACTIVATION constexpr the kernels branch on
    apply: Callable[[torch.Tensor, float], torch.Tensor]  # the PyTorch computation: apply(z, negative_slope)
    module: type[nn.Module]  # the nn module fuse() recognises and unfuse() puts back
    functions: tuple = ()  # functional forms fuse() recognises (F.relu, torch.relu_, ...); unfuse() writes the first
    methods: tuple[str, ...] = ()  # tensor methods fuse() recognises (x.relu())
    has_slope: bool = False  # takes negative_slope (leaky_relu)
    settings: Callable = _default

    def make_module(self, negative_slope: float = DEFAULT_SLOPE) -> nn.Module:
        return self.module(negative_slope) if self.has_slope else self.module()


def _leaky_slope(get):
    slope = get(1, "negative_slope", DEFAULT_SLOPE)
    return float(slope) if isinstance(slope, (int, float)) else None


REGISTRY = {a.name: a for a in (
    Activation("identity", 0, lambda z, slope: z, nn.Identity),
    Activation("relu", 1, lambda z, slope: F.relu(z), nn.ReLU, (F.relu, torch.relu, F.relu_, torch.relu_),
               ("relu", "relu_")),
    Activation("leaky_relu", 2, lambda z, slope: F.leaky_relu(z, slope), nn.LeakyReLU, (F.leaky_relu, F.leaky_relu_),
               has_slope=True, settings=_leaky_slope),
    Activation("relu6", 3, lambda z, slope: F.relu6(z), nn.ReLU6, (F.relu6,)),
    Activation("elu", 4, lambda z, slope: F.elu(z), nn.ELU, (F.elu, F.elu_),
               settings=lambda get: DEFAULT_SLOPE if get(1, "alpha", 1.0) == 1.0 else None),
    Activation("silu", 5, lambda z, slope: F.silu(z), nn.SiLU, (F.silu,)),
    Activation("gelu", 6, lambda z, slope: F.gelu(z), nn.GELU, (F.gelu,),
               settings=lambda get: DEFAULT_SLOPE if get(1, "approximate", "none") == "none" else None),
    Activation("hardswish", 7, lambda z, slope: F.hardswish(z), nn.Hardswish, (F.hardswish,)),
)}

ACTIVATIONS = tuple(REGISTRY)
KERNEL_IDS = {a.name: a.kernel_id for a in REGISTRY.values()}
