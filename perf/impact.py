"""Impact study: measure the usual claims about batch normalization on real data.

`tritonbn-perf impact` trains a small CNN and an MLP on scikit-learn's bundled handwritten digits, once with
tritonbn's fused BatchNormAct modules and once without batch norm (plain conv/linear with bias + ReLU, and
optionally the plain net with dropout), sweeping learning rates, initialisation scales and seeds. It then
measures each of five claims and decides a verdict per claim from the numbers with the rules in `RULES`:

1. BN makes training less sensitive to initialisation;
2. BN acts as a regulariser;
3. BN allows higher learning rates and speeds up convergence;
4. BN adds computational overhead;
5. BN works by reducing internal covariate shift (ICS).

Which BN path runs: on CUDA the fused Triton kernels; on CPU the plain PyTorch reference path, even when
TRITON_INTERPRET=1 is set (the test session sets it), because training through the Triton interpreter
takes minutes per run. `--kernels` asks for the interpreter on CPU anyway. The path that really ran is
written to impact.md.

ICS (see `layer_drift`): on a fixed probe batch, the input of every
weight layer after the first is captured every `eval_every` steps, and the drift between consecutive
captures is the per-unit 1-D Wasserstein distance, in units of the layer's activation spread.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODEL_KINDS = ("cnn", "mlp")
ARMS = ("bn", "plain", "dropout")
ARM_LABELS = {"bn": "tritonbn BN", "plain": "no BN", "dropout": "no BN + dropout"}
HELD, NOT_HELD, MIXED = "held", "did not hold", "mixed"
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------- settings
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
    eval_every: int = 15  # steps between test evaluations and ICS captures
    trains_threshold: float = 0.8  # final test accuracy above which a run "still trains"
    target_accuracy: float = 0.9  # test accuracy whose first crossing gives "steps to target"
    probe_size: int = 256
    timing_steps: int = 30
    timing_repeats: int = 5
    split_seed: int = 0
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.steps < self.eval_every:
            raise ValueError(f"steps ({self.steps}) must reach the first evaluation (every {self.eval_every})")
        if self.base_lr not in self.lrs or 1.0 not in self.init_scales:
            raise ValueError("the base LR must be one of the swept LRs and 1 one of the init scales")

    @classmethod
    def quick(cls, **overrides) -> StudyConfig:
        """Settings for a run in well under a minute on 2 CPU cores (used by the tests)."""
        quick = dict(preset="quick", seeds=(0,), steps=90, lrs=(0.003, 0.03, 0.3, 3.0), init_scales=(0.01, 1.0, 100.0),
                     eval_every=10, timing_steps=10, timing_repeats=3)
        return cls(**{**quick, **overrides})


@dataclasses.dataclass(frozen=True)
class RunSpec:
    model_kind: str
    arm: str
    lr: float
    init_scale: float
    seed: int
    measure_ics: bool = False


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

    def steps_to(self, accuracy: float) -> int | None:
        return next((s for s, a in zip(self.eval_steps, self.test_acc) if a >= accuracy), None)


# ------------------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class DigitSplit:
    x_train: torch.Tensor  # (N, 1, 8, 8), standardised with the training set's mean and std
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digit_split(device: torch.device | str, split_seed: int = 0, test_fraction: float = 0.25) -> DigitSplit:
    """The 1797 bundled 8x8 digits, split once by `split_seed` (independent of the training seeds)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_test = round(len(labels) * test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    pixels = torch.tensor((images - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
    targets = torch.tensor(labels, dtype=torch.long)
    return DigitSplit(pixels[train_idx].to(device), targets[train_idx].to(device),
                      pixels[test_idx].to(device), targets[test_idx].to(device))


# ----------------------------------------------------------------------------------------------- models
CNN_WIDTHS = (8, 16, 16)
MLP_WIDTHS = (128, 128, 128)


def _block(kind: str, arm: str, fan_in: int, fan_out: int, dropout: float) -> list[nn.Module]:
    """One hidden layer: weight layer, then fused BN+ReLU (bn) or bias + ReLU (plain, dropout)."""
    import tritonbn

    conv = kind == "cnn"
    weight_layer = (nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=arm != "bn") if conv
                    else nn.Linear(fan_in, fan_out, bias=arm != "bn"))
    if arm == "bn":
        norm = tritonbn.BatchNormAct2d if conv else tritonbn.BatchNormAct1d
        return [weight_layer, norm(fan_out, activation="relu")]
    layers = [weight_layer, nn.ReLU()]
    if arm == "dropout":
        layers.append(nn.Dropout(dropout))
    return layers


def build_model(kind: str, arm: str, dropout: float = 0.2) -> nn.Sequential:
    """The CNN (8x8 -> 3x3 conv 8 -> conv 16 -> pool -> conv 16 -> pool -> linear) or the MLP (64 -> 3x128 ->
    linear), in one of the ARMS; parameters come from the global torch RNG."""
    if arm not in ARMS or kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {kind!r} / arm {arm!r}")
    if kind == "cnn":
        c1, c2, c3 = CNN_WIDTHS
        layers = [*_block(kind, arm, 1, c1, dropout), *_block(kind, arm, c1, c2, dropout), nn.MaxPool2d(2),
                  *_block(kind, arm, c2, c3, dropout), nn.MaxPool2d(2), nn.Flatten(),
                  nn.Linear(c3 * 2 * 2, NUM_CLASSES)]
    else:
        widths = (64, *MLP_WIDTHS)
        layers = [nn.Flatten()]
        for fan_in, fan_out in zip(widths, widths[1:]):
            layers += _block(kind, arm, fan_in, fan_out, dropout)
        layers.append(nn.Linear(widths[-1], NUM_CLASSES))
    return nn.Sequential(*layers)


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def scale_init(model: nn.Module, scale: float) -> None:
    """Multiply every conv/linear weight (not biases, not BN's gamma) by `scale`."""
    with torch.no_grad():
        for _, layer in _weight_layers(model):
            layer.weight.mul_(scale)


# -------------------------------------------------------------------------------- internal covariate shift
class LayerInputProbe:
    """Captures the input of every weight layer after the first (the first sees the data, which never
    shifts) on a fixed probe batch, in training mode as the layer sees it while training."""

    def __init__(self, model: nn.Module, probe: torch.Tensor):
        self.model, self.probe = model, probe
        self.layers = [(f"L{i + 2} {type(m).__name__}", m) for i, (_, m) in
                       enumerate(_weight_layers(model)[1:])]
        self.previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.drift: dict[str, list[float]] = {name: [] for name, _ in self.layers}

    def capture(self) -> None:
        inputs: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
                 for name, m in self.layers]
        try:
            with torch.no_grad(), _buffers_restored(self.model):
                self.model(self.probe)
        finally:
            for hook in hooks:
                hook.remove()
        for name, _ in self.layers:
            current = _per_unit_sorted(inputs[name])
            if name in self.previous:
                self.drift[name].append(layer_drift(self.previous[name], current))
            self.previous[name] = current


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Training-mode BN updates running stats; a probe must leave them as they were."""
    saved = [buffer.clone() for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


def _per_unit_sorted(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


# --------------------------------------------------------------------------------------------- training
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eval-mode accuracy; a sample whose logits are not finite counts as wrong."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train(was_training)
    correct = (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)
    return float(correct.float().mean())


def _batches(n: int, batch_size: int, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batch indices, the same sequence for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def make_model(spec: RunSpec, config: StudyConfig, device: torch.device) -> nn.Module:
    torch.manual_seed(spec.seed)
    model = build_model(spec.model_kind, spec.arm, config.dropout).to(device)
    scale_init(model, spec.init_scale)
    return model


def train_run(data: DigitSplit, spec: RunSpec, config: StudyConfig) -> RunResult:
    """Train one model with SGD+momentum for `config.steps` steps (stopping early if the loss stops being
    finite) and record test accuracy, training loss and, if asked, ICS every `eval_every` steps."""
    device = data.x_train.device
    model = make_model(spec, config, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=config.momentum)
    probe = LayerInputProbe(model, data.x_train[: config.probe_size]) if spec.measure_ics else None
    if probe:
        probe.capture()
    eval_steps, train_loss, test_acc, losses = [], [], [], []
    diverged = False
    batches = _batches(len(data.y_train), config.batch_size, spec.seed, device)
    for step in range(1, config.steps + 1):
        idx = next(batches)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
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
                     diverged=diverged, ics=probe.drift if probe else None)


def time_steps(data: DigitSplit, kind: str, config: StudyConfig) -> dict[str, list[float]]:
    """Seconds per training step of the BN and the plain net, `timing_repeats` measurements each of
    `timing_steps` steps, interleaved so that machine noise hits both arms alike."""
    device = data.x_train.device
    arms = ("bn", "plain")
    models = {arm: make_model(RunSpec(kind, arm, config.base_lr, 1.0, config.seeds[0]), config, device)
              for arm in arms}
    optimizers = {arm: torch.optim.SGD(m.parameters(), lr=config.base_lr, momentum=config.momentum)
                  for arm, m in models.items()}
    batches = _batches(len(data.y_train), config.batch_size, config.seeds[0], device)
    samples = {arm: [] for arm in arms}

    def steps(arm: str, count: int) -> None:
        for _ in range(count):
            idx = next(batches)
            loss = F.cross_entropy(models[arm](data.x_train[idx]), data.y_train[idx])
            optimizers[arm].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[arm].step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for arm in arms:  # warm-up: allocator, kernel compilation, autotuning
        steps(arm, 3)
    for _ in range(config.timing_repeats):
        for arm in arms:
            start = time.perf_counter()
            steps(arm, config.timing_steps)
            samples[arm].append((time.perf_counter() - start) / config.timing_steps)
    return samples


# ------------------------------------------------------------------------------------------------- plan
def plan_runs(config: StudyConfig) -> list[RunSpec]:
    """Every training run the study needs, each once: the LR sweep (init scale 1), the init-scale sweep
    (base LR) and the baseline runs (base LR, scale 1; with ICS for bn/plain, plus the dropout arm)."""
    specs: dict[tuple, RunSpec] = {}

    def add(spec: RunSpec) -> None:
        key = (spec.model_kind, spec.arm, spec.lr, spec.init_scale, spec.seed)
        if spec.measure_ics or key not in specs:
            specs[key] = spec

    for kind in config.models:
        for seed in config.seeds:
            for arm in ("bn", "plain"):
                for lr in config.lrs:
                    add(RunSpec(kind, arm, lr, 1.0, seed))
                for scale in config.init_scales:
                    add(RunSpec(kind, arm, config.base_lr, scale, seed))
                add(RunSpec(kind, arm, config.base_lr, 1.0, seed, measure_ics=True))
            if config.dropout > 0:
                add(RunSpec(kind, "dropout", config.base_lr, 1.0, seed))
    return list(specs.values())


# ---------------------------------------------------------------------------------------------- verdicts
RULES = {
    1: "held if BN's spread (std of final test accuracy over the init scales, per seed) is lower than "
       "no-BN's by more than the noise floor; otherwise did not hold.",
    2: "held if BN's train-test accuracy gap is smaller than no-BN's by more than the noise floor and BN's "
       "test accuracy is not lower beyond it; mixed if the gap is smaller but test accuracy is lower "
       "(less overfitting from fitting less); otherwise did not hold. Dropout is shown for reference.",
    3: "held if BN both trains at a larger learning rate (largest grid LR with mean final test accuracy "
       ">= the trains-threshold) and reaches the target accuracy in fewer steps (best over LRs, all seeds "
       "reaching it); did not hold if neither; mixed if one.",
    4: "held if a BN training step is slower than a no-BN step by more than max(5%, timing noise = the "
       "larger relative interquartile range of the two); otherwise did not hold.",
    5: "held if BN's ICS is below 0.9x no-BN's in every measured layer and BN reaches the target accuracy "
       "in fewer steps at the base LR; did not hold if BN's ICS is not below 0.9x no-BN's in any layer; "
       "mixed otherwise.",
}
NOISE_RULE = ("noise floor: a difference of means counts only if it exceeds max(margin, 2 x standard error "
              "of the difference over seeds); margins are 0.02 (claim 1) and 0.005 (claim 2) in accuracy.")


def compare_means(a: Sequence[float], b: Sequence[float], margin: float) -> int:
    """+1 if mean(a) exceeds mean(b) beyond the noise floor, -1 if it falls short of it, 0 otherwise."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    variance = (a.var(ddof=1) / len(a) if len(a) > 1 else 0.0) + (b.var(ddof=1) / len(b) if len(b) > 1 else 0.0)
    difference = a.mean() - b.mean()
    return int(np.sign(difference)) if abs(difference) > max(margin, 2 * math.sqrt(variance)) else 0


def combine_verdicts(per_model: Sequence[str]) -> str:
    """One verdict for the claim: the models' common verdict, mixed when they disagree."""
    return per_model[0] if len(set(per_model)) == 1 else MIXED


@dataclasses.dataclass
class ClaimRow:
    number: int
    claim: str
    figures: str
    verdict: str
    plots: tuple[str, ...]


class Results:
    """Run results indexed for the analyses."""

    def __init__(self, runs: Sequence[RunResult], config: StudyConfig):
        self.runs, self.config = list(runs), config

    def find(self, kind: str, arm: str, lr: float, scale: float, seed: int) -> RunResult:
        return next(r for r in self.runs if (r.spec.model_kind, r.spec.arm, r.spec.lr, r.spec.init_scale,
                                             r.spec.seed) == (kind, arm, lr, scale, seed))

    def baseline(self, kind: str, arm: str, seed: int) -> RunResult:
        return self.find(kind, arm, self.config.base_lr, 1.0, seed)

    def final_acc(self, kind: str, arm: str, lr: float, scale: float) -> list[float]:
        return [self.find(kind, arm, lr, scale, s).final_test_acc for s in self.config.seeds]


def _fmt(values: Sequence[float] | float, digits: int = 3) -> str:
    value = float(np.mean(values))
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _steps_text(steps: float) -> str:
    return "never" if not math.isfinite(steps) else f"{steps:.0f}"


def claim_init_sensitivity(res: Results) -> tuple[str, str]:
    cfg, texts, verdicts = res.config, [], []
    for kind in cfg.models:
        spread, span, worst = {}, {}, {}
        for arm in ("bn", "plain"):
            per_seed = np.array([[res.find(kind, arm, cfg.base_lr, s, seed).final_test_acc
                                  for s in cfg.init_scales] for seed in cfg.seeds])
            spread[arm] = per_seed.std(axis=1)
            span[arm] = per_seed.max(axis=1) - per_seed.min(axis=1)
            worst[arm] = per_seed.min(axis=1)
        verdicts.append(HELD if compare_means(spread["plain"], spread["bn"], 0.02) > 0 else NOT_HELD)
        texts.append(f"{kind.upper()}: std of test acc over scales BN {_fmt(spread['bn'])} vs no-BN "
                     f"{_fmt(spread['plain'])}; min-max range BN {_fmt(span['bn'])} vs {_fmt(span['plain'])}; "
                     f"worst acc BN {_fmt(worst['bn'])} vs {_fmt(worst['plain'])}")
    return "<br>".join(texts), combine_verdicts(verdicts)


def claim_regularisation(res: Results) -> tuple[str, str]:
    cfg, texts, verdicts = res.config, [], []
    arms = ("bn", "plain", "dropout") if cfg.dropout > 0 else ("bn", "plain")
    for kind in cfg.models:
        gap = {a: [res.baseline(kind, a, s).final_train_acc - res.baseline(kind, a, s).final_test_acc
                   for s in cfg.seeds] for a in arms}
        test = {a: [res.baseline(kind, a, s).final_test_acc for s in cfg.seeds] for a in arms}
        smaller_gap = compare_means(gap["plain"], gap["bn"], 0.005) > 0
        lower_test = compare_means(test["plain"], test["bn"], 0.005) > 0
        verdicts.append(MIXED if smaller_gap and lower_test else HELD if smaller_gap else NOT_HELD)
        texts.append(f"{kind.upper()}: train-test gap " + ", ".join(
            f"{ARM_LABELS[a]} {_fmt(gap[a])} (test {_fmt(test[a])})" for a in arms))
    return "<br>".join(texts), combine_verdicts(verdicts)


def largest_training_lr(res: Results, kind: str, arm: str) -> float:
    """Largest grid LR whose mean final test accuracy over seeds reaches the trains-threshold (0 if none)."""
    cfg = res.config
    return max((lr for lr in cfg.lrs if np.mean(res.final_acc(kind, arm, lr, 1.0)) >= cfg.trains_threshold),
               default=0.0)


def steps_to_target(res: Results, kind: str, arm: str, lr: float, scale: float = 1.0) -> float:
    """Steps until every seed's test accuracy first reaches the target (inf if one never does)."""
    steps = [res.find(kind, arm, lr, scale, s).steps_to(res.config.target_accuracy) for s in res.config.seeds]
    return math.inf if None in steps else float(max(steps))


def claim_learning_rate(res: Results) -> tuple[str, str]:
    cfg, texts, verdicts = res.config, [], []
    for kind in cfg.models:
        max_lr = {a: largest_training_lr(res, kind, a) for a in ("bn", "plain")}
        best = {a: min(steps_to_target(res, kind, a, lr) for lr in cfg.lrs) for a in ("bn", "plain")}
        at_base = {a: steps_to_target(res, kind, a, cfg.base_lr) for a in ("bn", "plain")}
        higher, faster = max_lr["bn"] > max_lr["plain"], best["bn"] < best["plain"]
        verdicts.append(HELD if higher and faster else NOT_HELD if not (higher or faster) else MIXED)
        texts.append(f"{kind.upper()}: largest LR that trains BN {max_lr['bn']:g} vs no-BN {max_lr['plain']:g}; "
                     f"steps to {cfg.target_accuracy:.0%} test acc, best LR: BN {_steps_text(best['bn'])} vs "
                     f"{_steps_text(best['plain'])}, at base LR {cfg.base_lr:g}: BN {_steps_text(at_base['bn'])} "
                     f"vs {_steps_text(at_base['plain'])}")
    return "<br>".join(texts), combine_verdicts(verdicts)


def _relative_iqr(samples: Sequence[float]) -> float:
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return float((q3 - q1) / median)


def claim_overhead(timings: dict[str, dict[str, list[float]]], config: StudyConfig) -> tuple[str, str]:
    texts, verdicts = [], []
    for kind in config.models:
        t_bn, t_plain = (float(np.median(timings[kind][a])) for a in ("bn", "plain"))
        noise = max(0.05, *(_relative_iqr(timings[kind][a]) for a in ("bn", "plain")))
        overhead = t_bn / t_plain - 1
        verdicts.append(HELD if overhead > noise else NOT_HELD)
        texts.append(f"{kind.upper()}: {t_bn * 1e3:.2f} ms/step with BN vs {t_plain * 1e3:.2f} without "
                     f"({overhead:+.0%}; BN share of the BN step {(t_bn - t_plain) / t_bn:.0%}; "
                     f"noise {noise:.0%})")
    return "<br>".join(texts), combine_verdicts(verdicts)


def mean_ics(res: Results, kind: str, arm: str) -> dict[str, float]:
    """Per layer: drift averaged over the training run and the seeds (baseline runs)."""
    per_seed = [res.baseline(kind, arm, s).ics for s in res.config.seeds]
    return {layer: float(np.mean([np.mean(d[layer]) if d[layer] else math.nan for d in per_seed]))
            for layer in per_seed[0]}


def claim_covariate_shift(res: Results) -> tuple[str, str]:
    cfg, texts, verdicts = res.config, [], []
    for kind in cfg.models:
        ics = {a: mean_ics(res, kind, a) for a in ("bn", "plain")}
        lower = [ics["bn"][layer] < 0.9 * ics["plain"][layer] for layer in ics["bn"]]
        steps = {a: steps_to_target(res, kind, a, cfg.base_lr) for a in ("bn", "plain")}
        faster = steps["bn"] < steps["plain"]
        verdicts.append(HELD if all(lower) and faster else NOT_HELD if not any(lower) else MIXED)
        layers = ", ".join(f"{layer.split()[0]} {_fmt(ics['bn'][layer])}/{_fmt(ics['plain'][layer])}"
                           for layer in ics["bn"])
        texts.append(f"{kind.upper()}: ICS BN/no-BN per layer {layers}; steps to "
                     f"{cfg.target_accuracy:.0%} at base LR BN {_steps_text(steps['bn'])} vs "
                     f"{_steps_text(steps['plain'])}")
    return "<br>".join(texts), combine_verdicts(verdicts)


CLAIMS = {
    1: "BN makes training less sensitive to initialisation",
    2: "BN acts as a regulariser (smaller generalisation gap, less need for dropout)",
    3: "BN allows higher learning rates and speeds up convergence",
    4: "BN adds computational overhead",
    5: "BN works by reducing internal covariate shift",
}
CLAIM_PLOTS = {1: ("init_sweep.png",), 2: ("generalisation.png",), 3: ("lr_sweep.png", "curves.png"),
               4: ("timing.png",), 5: ("ics.png",)}


def analyse(res: Results, timings: dict[str, dict[str, list[float]]]) -> list[ClaimRow]:
    measured = {1: claim_init_sensitivity(res), 2: claim_regularisation(res), 3: claim_learning_rate(res),
                4: claim_overhead(timings, res.config), 5: claim_covariate_shift(res)}
    return [ClaimRow(n, CLAIMS[n], *measured[n], CLAIM_PLOTS[n]) for n in CLAIMS]


# ----------------------------------------------------------------------------------------- path control
@contextlib.contextmanager
def study_environment(device: torch.device, kernels: bool) -> Iterator[str]:
    """Enter the BN path and CPU float mode the study trains under; yields a description of the path.

    CUDA always runs the fused kernels. A CPU runs the reference path unless `kernels` asks for the Triton
    interpreter (TRITON_INTERPRET=1 before triton is imported), which is exact but makes each run take
    minutes. On CPU, denormals are flushed to zero: late in training the tiny gradients of these nets
    turn denormal and slow CPU convolutions down some 50-fold, which would swamp every timing."""
    from tritonbn import backend

    if kernels and device.type == "cpu" and not backend.kernels_interpreted():
        raise RuntimeError("--kernels on a CPU needs TRITON_INTERPRET=1 set before triton is imported")
    path = backend.cpu_reference() if device.type == "cpu" and not kernels else contextlib.nullcontext()
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        with path:
            yield describe_bn_path(device)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def describe_bn_path(device: torch.device) -> str:
    """Which path tritonbn's BN modules take for a tensor on `device` in the current context."""
    from tritonbn import backend

    if not backend.uses_kernels(torch.empty(0, device=device)):
        return "PyTorch reference path (tritonbn.reference)"
    return "fused Triton kernels" + (" under the Triton interpreter" if device.type == "cpu" else "")


# ------------------------------------------------------------------------------------------- the study
@dataclasses.dataclass(frozen=True)
class StudyInfo:
    """How a study ran, for the report."""

    device: str
    bn_path: str
    kernels: bool
    workers: int
    threads: int
    n_runs: int
    elapsed_s: float


_WORKER: dict = {}  # a worker process's data and settings, set once by _start_worker


def _start_worker(config: StudyConfig, kernels: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(config=config, kernels=kernels,
                   data=load_digit_split("cpu", config.split_seed, config.test_fraction))


def _train_in_worker(spec: RunSpec) -> RunResult:
    with study_environment(torch.device("cpu"), _WORKER["kernels"]):
        return train_run(_WORKER["data"], spec, _WORKER["config"])


def train_all(specs: Sequence[RunSpec], data: DigitSplit, config: StudyConfig, bar, *, kernels: bool,
              workers: int, threads: int) -> list[RunResult]:
    """Every run, in `specs` order. On a CPU the runs are spread over `workers` processes, because nets
    this small gain little from intra-op threads; each run seeds itself, so the results do not depend
    on the number of workers. The caller is inside `study_environment`."""
    if workers <= 1 or data.x_train.device.type != "cpu":
        runs = []
        for spec in specs:
            bar.set_postfix_str(f"{spec.model_kind} {spec.arm} lr={spec.lr:g} scale={spec.init_scale:g}")
            runs.append(train_run(data, spec, config))
            bar.update()
        return runs
    bar.set_postfix_str(f"{workers} worker processes")
    spawn = multiprocessing.get_context("spawn")  # a forked child would inherit torch's thread pool state
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_start_worker,
                             initargs=(config, kernels, threads)) as pool:
        futures = [pool.submit(_train_in_worker, spec) for spec in specs]
        for _ in as_completed(futures):
            bar.update()
        return [future.result() for future in futures]


def run_study(config: StudyConfig, device: torch.device, out_dir: Path, *, kernels: bool = False,
              workers: int = 1, threads: int = 1, progress: bool = True) -> tuple[list[ClaimRow], Path]:
    """Run every training run and the timing, write results.json, the plots and impact.md."""
    from tqdm import tqdm

    from tritonbn.perf import impact_plots

    specs = plan_runs(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with study_environment(device, kernels) as bn_path, tqdm(
                total=len(specs) + len(config.models), desc="impact", unit="run", disable=not progress) as bar:
            data = load_digit_split(device, config.split_seed, config.test_fraction)
            runs = train_all(specs, data, config, bar, kernels=kernels, workers=workers, threads=threads)
            timings = {}
            for kind in config.models:  # after training, so that no worker competes with the clock
                bar.set_postfix_str(f"{kind} timing")
                timings[kind] = time_steps(data, kind, config)
                bar.update()
    finally:
        torch.set_num_threads(previous_threads)
    results = Results(runs, config)
    rows = analyse(results, timings)
    impact_plots.write_all(results, timings, out_dir, f"{device.type}, {threads} thread(s)\n{bn_path}")
    info = StudyInfo(device.type, bn_path, kernels, workers, threads, len(specs), time.perf_counter() - started)
    _write_json(out_dir / "results.json", config, runs, timings, info)
    report = out_dir / "impact.md"
    report.write_text(render_report(rows, config, info))
    return rows, report


def _write_json(file: Path, config: StudyConfig, runs: Sequence[RunResult], timings: dict,
                info: StudyInfo) -> None:
    payload = {"config": dataclasses.asdict(config), **dataclasses.asdict(info), "timings_s_per_step": timings,
               "runs": [{**dataclasses.asdict(r.spec), **{k: v for k, v in dataclasses.asdict(r).items()
                                                          if k != "spec"}} for r in runs]}
    file.write_text(json.dumps(payload, indent=1))


def reproduce_command(config: StudyConfig, info: StudyInfo) -> str:
    parts = ["tritonbn-perf impact", *(["--quick"] if config.preset == "quick" else []),
             f"--device {info.device}", *(["--kernels"] if info.kernels else []),
             "--seeds " + " ".join(map(str, config.seeds)), f"--steps {config.steps}",
             "--models " + " ".join(config.models), f"--base-lr {config.base_lr:g}",
             f"--dropout {config.dropout:g}"]
    return " ".join(parts)


def render_report(rows: Sequence[ClaimRow], config: StudyConfig, info: StudyInfo) -> str:
    table = ["| # | Claim | Measured | Verdict | Plots |", "|---|---|---|---|---|"]
    table += [f"| {r.number} | {r.claim} | {r.figures} | **{r.verdict}** | "
              + ", ".join(f"[{p}]({p})" for p in r.plots) + " |" for r in rows]
    rules = [f"{n}. {RULES[n]}" for n in RULES]
    settings = {
        "data": f"sklearn load_digits, {1 - config.test_fraction:.0%}/{config.test_fraction:.0%} train/test "
                f"split with seed {config.split_seed}, standardised with the training set's mean and std",
        "models": f"CNN 3x3 conv{CNN_WIDTHS[0]}-conv{CNN_WIDTHS[1]}-pool-conv{CNN_WIDTHS[2]}-pool-linear; "
                  f"MLP 64-{'-'.join(map(str, MLP_WIDTHS))}-10; BN arm: weight "
                  "layers without bias + tritonbn.BatchNormAct (relu); no-BN arm: bias + ReLU; dropout arm: "
                  f"no-BN + dropout p={config.dropout:g} after each hidden layer",
        "BN path": f"{info.bn_path} on {info.device}",
        "ran on": f"{info.workers} worker process(es) x {info.threads} torch thread(s); the timing runs alone "
                  f"in the main process with {info.threads} thread(s)",
        "training": f"SGD momentum {config.momentum:g}, batch {config.batch_size}, {config.steps} steps, "
                    f"base LR {config.base_lr:g}, evaluation and ICS capture every {config.eval_every} steps; a run "
                    "stops when its loss is no longer finite, and non-finite logits count as wrong answers",
        "seeds": ", ".join(map(str, config.seeds)) + " (torch.manual_seed for init and dropout; the same "
                 "seed shuffles the mini-batches)",
        "learning rates": ", ".join(f"{lr:g}" for lr in config.lrs) + " (init scale 1)",
        "init scales": ", ".join(f"{s:g}" for s in config.init_scales) + f" (LR {config.base_lr:g}; every "
                       "conv/linear weight multiplied by the scale)",
        "thresholds": f"trains = final test acc >= {config.trains_threshold:g}; target test acc "
                      f"{config.target_accuracy:g}",
        "ICS": "input of every weight layer after the first on a fixed probe batch of "
               f"{config.probe_size} training images, in training mode (BN running stats restored after); "
               "drift between consecutive captures = per-unit 1-D Wasserstein distance averaged over units, "
               "divided by the units' mean std at the earlier capture; averaged over the run and seeds",
        "timing": f"median of {config.timing_repeats} x {config.timing_steps} training steps per arm, arms "
                  "interleaved, after 3 warm-up steps; BN share = (t_BN - t_noBN) / t_BN",
        "runs": f"{info.n_runs} training runs plus the timing, {info.elapsed_s:.0f} s in all",
    }
    lines = ["# Batch-norm impact study", "",
             "Each claim about batch normalization measured on scikit-learn's handwritten digits. Verdicts "
             "are decided from the numbers by the rules below; they describe this data and these small "
             "nets, not batch norm in general.", "", *table, "",
             "## Verdict rules", "", *rules, "", NOISE_RULE, "",
             "Claim 5 compares ICS with training speed; it is a correlation on one dataset and cannot show "
             "that BN works *because* of lower ICS.", "", "## Settings", "",
             *[f"- **{k}**: {v}" for k, v in settings.items()], "", "## Reproduce", "", "```",
             reproduce_command(config, info), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `tritonbn-perf impact`."""
    default = StudyConfig()
    parser.add_argument("--quick", action="store_true", help="a small sweep that runs in well under a minute")
    parser.add_argument("--out", type=Path, default=Path("report/impact"), help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default {default.seeds})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--kernels", action="store_true",
                        help="on a CPU, train through the Triton kernels under the interpreter (needs "
                             "TRITON_INTERPRET=1; very slow) instead of the reference path; CUDA always runs "
                             "the kernels")
    parser.add_argument("--models", nargs="+", choices=MODEL_KINDS, help="which nets to study")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {default.steps})")
    parser.add_argument("--base-lr", type=float, help=f"LR of the init sweep and baseline (default "
                                                      f"{default.base_lr:g})")
    parser.add_argument("--dropout", type=float, help=f"dropout arm's p, 0 to skip it (default {default.dropout:g})")
    parser.add_argument("--workers", type=int,
                        help="CPU runs train in this many processes at once (default: 2 if the machine has "
                             "2 cores; 1 with --quick, whose runs are too few to repay starting processes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: these nets are too small to gain from more)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    overrides = {name: value for name, value in (
        ("seeds", tuple(args.seeds) if args.seeds else None), ("models", tuple(args.models) if args.models else None),
        ("steps", args.steps), ("base_lr", args.base_lr), ("dropout", args.dropout)) if value is not None}
    return StudyConfig.quick(**overrides) if args.quick else StudyConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    """Run the study from parsed `add_arguments` flags; prints the verdicts and the report's path."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        config = config_from_args(args)
    except ValueError as error:  # settings that contradict each other are a usage error, not a crash
        print(f"tritonbn-perf impact: error: {error}", file=sys.stderr)
        return 2
    workers = args.workers or (1 if args.quick else min(2, os.cpu_count() or 1))
    rows, report = run_study(config, device, args.out, kernels=args.kernels, workers=workers,
                             threads=args.threads, progress=not args.no_progress)
    for row in rows:
        print(f"claim {row.number} ({row.claim}): {row.verdict}")
    print(f"report: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonbn-perf impact", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
