"""One training run of the impact study (the test accuracy, loss, ICS and loss landscape it records), and the
timing of training steps with and without BN (claim 4)."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import StudyConfig
from .covariate_shift import LayerInputProbe, buffers_restored
from .data import DigitSplit, shuffled_batches
from .landscape import LandscapeTrace, probe_along_gradient
from .models import COMPARED_ARMS, build_model, scale_init
from .noise import noise_held


@dataclasses.dataclass(frozen=True)
class RunSpec:
    model_kind: str
    arm: str
    lr: float
    init_scale: float
    seed: int
    measure_ics: bool = False
    measure_landscape: bool = False


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    eval_steps: list[int]
    train_loss: list[float]  # mean training loss over the steps since the previous evaluation
    test_acc: list[float]
    final_train_acc: float
    final_test_acc: float
    diverged: bool
    ics: dict[str, list[float]] | None  # layer name -> drift between consecutive captures
    landscape: LandscapeTrace | None = None

    def steps_to(self, accuracy: float) -> int | None:
        return next((s for s, a in zip(self.eval_steps, self.test_acc) if a >= accuracy), None)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eval-mode accuracy; a sample whose logits are not finite counts as wrong."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train(was_training)
    correct = (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)
    return float(correct.float().mean())


def make_model(spec: RunSpec, config: StudyConfig, device: torch.device) -> nn.Module:
    torch.manual_seed(spec.seed)
    model = build_model(spec.model_kind, spec.arm, config.dropout, config.noise).to(device)
    scale_init(model, spec.init_scale)
    return model


def train_run(data: DigitSplit, spec: RunSpec, config: StudyConfig) -> RunResult:
    """Train one model with SGD+momentum for `config.steps` steps (stopping early if the loss stops being
    finite) and record test accuracy, training loss and, if asked, ICS every `eval_every` steps. If asked,
    the loss landscape is probed on the step's mini-batch before the first update and every `eval_every`
    updates, along the gradient at `config.landscape_step_multiples` x the LR."""
    device = data.x_train.device
    model = make_model(spec, config, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=config.momentum)
    probe = LayerInputProbe(model, data.x_train[: config.probe_size]) if spec.measure_ics else None
    if probe:
        probe.capture()
    landscape = LandscapeTrace() if spec.measure_landscape else None
    step_sizes = [multiple * spec.lr for multiple in config.landscape_step_multiples]
    eval_steps, train_loss, test_acc, losses = [], [], [], []
    diverged = False
    batches = shuffled_batches(len(data.y_train), config.batch_size, spec.seed, device)
    for step in range(1, config.steps + 1):
        idx = next(batches)
        x_batch, y_batch = data.x_train[idx], data.y_train[idx]
        if landscape is not None and (step - 1) % config.eval_every == 0:
            with buffers_restored(model), noise_held(model):
                point = probe_along_gradient(model, lambda x=x_batch, y=y_batch: F.cross_entropy(model(x), y),
                                             step_sizes)
            landscape.steps.append(step - 1)
            landscape.points.append(point)
        loss = F.cross_entropy(model(x_batch), y_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        diverged = not math.isfinite(losses[-1])
        if step % config.eval_every == 0 or diverged:
            eval_steps.append(step)
            train_loss.append(float(np.mean(losses)))
            test_acc.append(_accuracy(model, data.x_test, data.y_test))
            losses = []
            if probe:
                probe.capture()
        if diverged:
            break
    return RunResult(spec, eval_steps, train_loss, test_acc,
                     final_train_acc=_accuracy(model, data.x_train, data.y_train),
                     final_test_acc=test_acc[-1] if test_acc else _accuracy(model, data.x_test, data.y_test),
                     diverged=diverged, ics=probe.drift if probe else None, landscape=landscape)


def time_steps(data: DigitSplit, kind: str, config: StudyConfig) -> dict[str, list[float]]:
    """Seconds per training step of the BN and the plain net, `timing_repeats` measurements each of
    `timing_steps` steps, interleaved so that machine noise hits both arms alike."""
    device = data.x_train.device
    models = {arm: make_model(RunSpec(kind, arm, config.base_lr, 1.0, config.seeds[0]), config, device)
              for arm in COMPARED_ARMS}
    optimizers = {arm: torch.optim.SGD(m.parameters(), lr=config.base_lr, momentum=config.momentum)
                  for arm, m in models.items()}
    batches = shuffled_batches(len(data.y_train), config.batch_size, config.seeds[0], device)
    samples = {arm: [] for arm in COMPARED_ARMS}

    def steps(arm: str, count: int) -> None:
        for _ in range(count):
            idx = next(batches)
            loss = F.cross_entropy(models[arm](data.x_train[idx]), data.y_train[idx])
            optimizers[arm].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[arm].step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for arm in COMPARED_ARMS:  # warm-up: allocator, kernel compilation, autotuning
        steps(arm, 3)
    for _ in range(config.timing_repeats):
        for arm in COMPARED_ARMS:
            start = time.perf_counter()
            steps(arm, config.timing_steps)
            samples[arm].append((time.perf_counter() - start) / config.timing_steps)
    return samples
