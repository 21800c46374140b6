"""The settings of an impact study: what it sweeps, how each net trains and the thresholds its verdicts use."""

from __future__ import annotations

import dataclasses

from .models import COMPARED_ARMS, MODEL_KINDS
from .noise import PAPER_NOISE, NoiseModel


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    preset: str = "default"  # "quick" for StudyConfig.quick(); the grids below follow it
    models: tuple[str, ...] = MODEL_KINDS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    batch_size: int = 64
    base_lr: float = 0.03  # SGD+momentum LR of the init sweep, the baseline runs and ICS; one of `lrs`
    momentum: float = 0.9
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    init_scales: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
    dropout: float = 0.2  # 0 drops the dropout arm
    eval_every: int = 15  # steps between test evaluations, ICS captures and loss-landscape probes
    trains_threshold: float = 0.8  # final test accuracy above which a run "still trains"
    target_accuracy: float = 0.9  # test accuracy whose first crossing gives "steps to target"
    probe_size: int = 256
    # Loss-landscape probe's step sizes along the gradient, x the LR (the paper's VGG range, [1/2, 4] x LR).
    landscape_step_multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    noise_dose: float = 1.0  # noisy BN arm: multiplies the paper's per-unit shift and scale ranges (noise.py)
    timing_steps: int = 30
    timing_repeats: int = 5
    split_seed: int = 0
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.steps < self.eval_every:
            raise ValueError(f"steps ({self.steps}) must reach the first evaluation (every {self.eval_every})")
        if self.base_lr not in self.lrs or 1.0 not in self.init_scales:
            raise ValueError("the base LR must be one of the swept LRs and 1 one of the init scales")
        if self.noise_dose < 0:
            raise ValueError(f"the noise dose ({self.noise_dose:g}) must not be negative")

    @classmethod
    def quick(cls, **overrides) -> StudyConfig:
        """Settings for a run in well under a minute on 2 CPU cores (used by the tests)."""
        quick = dict(preset="quick", seeds=(0,), steps=90, lrs=(0.003, 0.03, 0.3, 3.0), init_scales=(0.01, 1.0, 100.0),
                     eval_every=10, timing_steps=10, timing_repeats=3)
        return cls(**{**quick, **overrides})

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms of claim 2 at the baseline settings: the compared ones, plus dropout unless its p is 0."""
        return (*COMPARED_ARMS, "dropout") if self.dropout > 0 else COMPARED_ARMS

    @property
    def noise(self) -> NoiseModel:
        """The noisy BN arm's noise: the paper's, its per-unit ranges multiplied by `noise_dose`."""
        return PAPER_NOISE.dosed(self.noise_dose)
