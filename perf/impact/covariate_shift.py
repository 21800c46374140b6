"""Internal covariate shift (claim 5), measured as the drift of each layer's input during training.

On a fixed probe batch, the input of every weight layer after the first is captured every `eval_every`
steps, and the drift between consecutive captures is the per-unit 1-D Wasserstein distance, in units of
the layer's activation spread (`layer_drift`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .models import weight_layers


class LayerInputProbe:
    """Captures the input of every weight layer after the first (the first sees the data, which never
    shifts) on a fixed probe batch, in training mode as the layer sees it while training."""

    def __init__(self, model: nn.Module, probe: torch.Tensor):
        self.model, self.probe = model, probe
        self.layers = [(f"L{i + 2} {type(m).__name__}", m) for i, (_, m) in
                       enumerate(weight_layers(model)[1:])]
        self.previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.drift: dict[str, list[float]] = {name: [] for name, _ in self.layers}

    def capture(self) -> None:
        inputs: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
                 for name, m in self.layers]
        try:
            with torch.no_grad(), buffers_restored(self.model):
                self.model(self.probe)
        finally:
            for hook in hooks:
                hook.remove()
        for name, _ in self.layers:
            current = per_unit_sorted(inputs[name])
            if name in self.previous:
                self.drift[name].append(layer_drift(self.previous[name], current))
            self.previous[name] = current


@contextlib.contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Training-mode BN updates running stats; a probe (of ICS or the landscape) must leave them as they were."""
    saved = [buffer.clone() for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


def per_unit_sorted(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted values per unit, std per unit); a unit is a channel (conv) or a feature (linear)."""
    per_unit = activations.detach().transpose(0, 1).reshape(activations.shape[1], -1).double()
    return per_unit.sort(dim=1).values, per_unit.std(dim=1)


def layer_drift(previous: tuple[torch.Tensor, torch.Tensor], current: tuple[torch.Tensor, torch.Tensor]) -> float:
    """ICS between two captures of one layer's input: the 1-D Wasserstein distance of each unit's
    activation distribution (equal sample counts, so the mean gap between sorted samples), averaged over
    units and divided by the units' mean standard deviation at the earlier capture. Dividing by the spread
    makes nets with different activation scales comparable: 0.1 means the distribution moved by a tenth
    of its own width."""
    sorted_prev, std_prev = previous
    sorted_cur, _ = current
    w1 = (sorted_cur - sorted_prev).abs().mean(dim=1)
    return float(w1.mean() / (std_prev.mean() + 1e-12))
