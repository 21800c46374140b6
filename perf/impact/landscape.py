"""The loss landscape along the training path (claim 5, intervention), measured as Santurkar et al. (NeurIPS
2018, arXiv 1805.11604, Section 3.2 and Appendix A.2.2) measure it.

At a training step with parameters theta, gradient g = grad L(theta) on that step's mini-batch, and a small
set of step sizes eta, the probe evaluates the same batch's loss and gradient at theta - eta * g:

- loss range: max - min over eta of L(theta - eta g) (the paper's "loss landscape" variation);
- gradient-change range: max - min over eta of ||grad L(theta - eta g) - g||_2 ("gradient predictiveness");
- effective beta-smoothness: max over eta of ||grad L(theta - eta g) - g||_2 / ||eta g||_2.

Nothing is trained: the parameters are put back afterwards, and the caller keeps BN's running statistics
and the injected noise fixed while it probes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

# LandscapePoint's measures and how the report and plots name them.
LANDSCAPE_MEASURES = {"loss_range": "loss range along the gradient",
                      "gradient_change_range": "gradient-change range (L2)",
                      "effective_beta": "effective beta-smoothness"}


@dataclasses.dataclass
class LandscapePoint:
    """One probe: the loss and the gradient's L2 change at each step size, and the gradient's norm."""

    step_sizes: list[float]
    losses: list[float]
    gradient_changes: list[float]
    gradient_norm: float

    @property
    def loss_range(self) -> float:
        return max(self.losses) - min(self.losses)

    @property
    def gradient_change_range(self) -> float:
        return max(self.gradient_changes) - min(self.gradient_changes)

    @property
    def effective_beta(self) -> float:
        if self.gradient_norm == 0:
            return math.nan
        return max(c / (eta * self.gradient_norm) for c, eta in zip(self.gradient_changes, self.step_sizes))


@dataclasses.dataclass
class LandscapeTrace:
    """The probes of one run, keyed by the number of updates the parameters had received."""

    steps: list[int] = dataclasses.field(default_factory=list)
    points: list[LandscapePoint] = dataclasses.field(default_factory=list)

    def series(self, measure: str) -> list[float]:
        """One of LandscapePoint's properties (`loss_range`, `gradient_change_range`, `effective_beta`) over
        the run."""
        return [getattr(p, measure) for p in self.points]


def _loss_and_gradient(loss_of: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> tuple[float, list]:
    loss = loss_of()
    return float(loss.detach()), [g.detach() for g in torch.autograd.grad(loss, params)]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def probe_along_gradient(model: nn.Module, loss_of: Callable[[], torch.Tensor],
                         step_sizes: Sequence[float]) -> LandscapePoint:
    """The loss and gradient change of `loss_of()` (the model's loss on a fixed batch) at theta - eta * g for
    each eta in `step_sizes`, g being the gradient at the model's current parameters theta, which are
    restored afterwards. Gradients come from autograd.grad, so the parameters' .grad is left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    _, gradient = _loss_and_gradient(loss_of, params)
    losses, changes = [], []
    try:
        for eta in step_sizes:
            with torch.no_grad():
                for p, p0, g in zip(params, start, gradient):
                    p.copy_(p0 - eta * g)
            loss, moved = _loss_and_gradient(loss_of, params)
            losses.append(loss)
            changes.append(_norm([a - b for a, b in zip(moved, gradient)]))
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
    return LandscapePoint(list(step_sizes), losses, changes, _norm(gradient))
