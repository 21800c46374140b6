"""`FusedSequential`: what `fuse` makes of an ``nn.Sequential`` when torch.fx cannot trace the model."""

from __future__ import annotations

import weakref

from torch import nn

from ..modules import FUSED_CLASS_OF, fused_like
from .fx_patterns import module_activation
from .hooks import call_hooks


def _fusable_pair(bn: nn.Module, follower: nn.Module | None) -> tuple[str, float] | None:
    """The (activation, negative slope) when ``bn`` is a plain batch norm and ``follower`` an activation
    module, neither with hooks: then one fused call computes what calling both in turn does."""
    if type(bn) not in FUSED_CLASS_OF:
        return None
    activation = module_activation(follower)
    if activation is None or call_hooks(bn) or call_hooks(follower):
        return None
    return activation


# Batch norm -> (its settings, the fused module `_fused_view` made for them).  Weak, so that a batch norm's
# entry goes with it; the entry does not refer to the batch norm itself.
_FUSED_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fused_view(bn: nn.Module, activation: str, negative_slope: float) -> nn.Module:
    """A fused module computing ``activation(bn(input))`` with ``bn``'s very parameter and buffer dicts, so
    that it follows whatever is done to them later (``.to()``, ``.double()``, new tensors assigned);
    made again when a setting of ``bn`` or the activation changes."""
    settings = (bn.training, bn.eps, bn.momentum, bn.track_running_stats, activation, negative_slope)
    cached = _FUSED_VIEWS.get(bn)
    if cached is None or cached[0] != settings:
        fused = fused_like(bn, activation, negative_slope)
        vars(fused).update(_parameters=bn._parameters, _buffers=bn._buffers)
        cached = _FUSED_VIEWS[bn] = (settings, fused)
    return cached[1]


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` that computes each adjacent (batch norm, activation module) pair with one fused
    call when it is called whole: what `fuse` makes of an ``nn.Sequential`` when torch.fx cannot trace
    the model.

    It holds, indexes and iterates over the very modules it held before, so code that reads inside it
    (``seq[1](x)``, ``for m in seq``) sees plain batch norms and activations computing what they always
    did.  Its forward finds the pairs on every call, so it computes what ``nn.Sequential`` computes for
    whatever the container holds then: a pair whose batch norm or activation has hooks at that time
    runs as two plain calls.
    """

    def forward(self, input):
        modules = list(self._modules.values())
        index = 0
        while index < len(modules):
            follower = modules[index + 1] if index + 1 < len(modules) else None
            activation = _fusable_pair(modules[index], follower)
            if activation is None:
                input = modules[index](input)
                index += 1
            else:
                input = _fused_view(modules[index], *activation)(input)
                index += 2
        return input
