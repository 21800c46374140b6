"""The "noisy BN" arm's noise: covariate shift injected on purpose after each batch norm (claim 5, intervention).

Santurkar, Tsipras, Ilyas and Madry, "How Does Batch Normalization Help Optimization?" (NeurIPS 2018, arXiv
1805.11604), Appendix A.2.1 and its Algorithm 1, perturb every batch-normalized activation a[i, j] (sample i,
unit j) at every training step t as

    mu[j] ~ U(-n_mu, n_mu),  sigma[j] ~ U(1, n_sigma)         once per unit and step (the step's distribution)
    m[i, j] ~ U(mu[j] - r_mu, mu[j] + r_mu),  s[i, j] ~ N(sigma[j], r_sigma)      per sample, from it
    a[i, j] <- s[i, j] * a[i, j] + m[i, j]

with n_mu = 0.5, n_sigma = 1.25 and r_mu = r_sigma = 0.1; for convolutions height and width count as part of
the batch, so a unit is a channel. So every unit's input distribution moves by a random shift and scale at
every step, which is internal covariate shift by construction. `BatchNormNoise` is that module, placed
between the BN and its ReLU. The paper writes N(sigma, r_sigma) without saying whether r_sigma is the
standard deviation or the variance; it is taken as the standard deviation here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """The parameters of Algorithm 1 (the paper's values by default)."""

    n_mu: float = 0.5  # a unit's shift for one step is uniform in [-n_mu, n_mu]
    n_sigma: float = 1.25  # a unit's scale for one step is uniform in [1, n_sigma]
    r_mu: float = 0.1  # half-width of the uniform spread of the shift around the unit's
    r_sigma: float = 0.1  # standard deviation of the normal spread of the scale around the unit's

    def dosed(self, dose: float) -> NoiseModel:
        """This noise with the per-unit step distribution's spread (n_mu, n_sigma - 1) multiplied by `dose`; the
        per-activation spread (r_mu, r_sigma) stays, so a larger dose is more covariate shift, not more
        per-sample noise."""
        return dataclasses.replace(self, n_mu=self.n_mu * dose, n_sigma=1 + (self.n_sigma - 1) * dose)

    @property
    def mean_scale(self) -> float:
        return (1 + self.n_sigma) / 2

    def describe(self) -> str:
        return (f"per unit and step: shift centre mu ~ U(-{self.n_mu:g}, {self.n_mu:g}), scale centre sigma ~ "
                f"U(1, {self.n_sigma:g}); per activation: shift ~ U(mu - {self.r_mu:g}, mu + {self.r_mu:g}), "
                f"scale ~ N(sigma, std {self.r_sigma:g}); a <- scale * a + shift")


PAPER_NOISE = NoiseModel()


class BatchNormNoise(nn.Module):
    """Algorithm 1's noise on a batch-normalized (N, C, *spatial) or (N, C) tensor, drawn anew at every forward
    in training mode. Evaluation applies the noise's expectation (scale (1 + n_sigma) / 2, shift 0), as
    dropout rescales at evaluation, so that the layers after it see the scale they were trained on.

    The draws come from the module's own generator, seeded at construction, so that the noise neither
    consumes nor depends on the global RNG that initialises the weights and shuffles dropout."""

    def __init__(self, seed: int, noise: NoiseModel = PAPER_NOISE):
        super().__init__()
        self.noise, self.seed = noise, seed
        self._generator: torch.Generator | None = None
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None
        self.holding = False

    def extra_repr(self) -> str:
        return f"{self.noise}, seed={self.seed}"

    def draw(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's (scale, shift), each shaped like `like`: unit centres first, then per-activation spread."""
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        n = self.noise
        unit_shape = (1, like.shape[1]) + (1,) * (like.dim() - 2)

        def uniform(shape, low: float, high: float) -> torch.Tensor:
            u = torch.rand(shape, generator=self._generator, device=like.device, dtype=like.dtype)
            return low + (high - low) * u

        mu, sigma = uniform(unit_shape, -n.n_mu, n.n_mu), uniform(unit_shape, 1.0, n.n_sigma)
        shift = mu + uniform(like.shape, -n.r_mu, n.r_mu)
        scale = sigma + n.r_sigma * torch.randn(like.shape, generator=self._generator, device=like.device,
                                                dtype=like.dtype)
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x * self.noise.mean_scale
        if not self.holding:
            scale, shift = self.draw(x)
        else:  # one draw for every forward while held (`noise_held`)
            if self._held is None or self._held[0].shape != x.shape:
                self._held = self.draw(x)
            scale, shift = self._held
        return scale * x + shift


@contextlib.contextmanager
def noise_held(model: nn.Module) -> Iterator[None]:
    """Within this block every `BatchNormNoise` of `model` reuses one draw, so that repeated forwards (the
    loss-landscape probe's) see the same network and differ only by their parameters."""
    modules = [m for m in model.modules() if isinstance(m, BatchNormNoise)]
    for m in modules:
        m.holding, m._held = True, None
    try:
        yield
    finally:
        for m in modules:
            m.holding, m._held = False, None
