"""The five claims, the figures measured for each, and the rules that turn those figures into a verdict.

Every function here reads finished runs (`Results`) or timings: nothing trains. A claim's figures and
verdict are computed per model, and the models' verdicts are combined by `combine_verdicts`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from .config import StudyConfig
from .models import ARM_LABELS, COMPARED_ARMS
from .training import RunResult

HELD, NOT_HELD, MIXED = "held", "did not hold", "mixed"

CLAIMS = {
    1: "BN makes training less sensitive to initialisation",
    2: "BN acts as a regulariser (smaller generalisation gap, less need for dropout)",
    3: "BN allows higher learning rates and speeds up convergence",
    4: "BN adds computational overhead",
    5: "BN works by reducing internal covariate shift",
}
# The figures of `plots.write_all` that show each claim's numbers; the report links them.
CLAIM_PLOTS = {1: ("init_sweep.png",), 2: ("generalisation.png",), 3: ("lr_sweep.png", "curves.png"),
               4: ("timing.png",), 5: ("ics.png",)}
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
    """Run results indexed for the analyses and the figures."""

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
        for arm in COMPARED_ARMS:
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
    for kind in cfg.models:
        gap = {a: [res.baseline(kind, a, s).final_train_acc - res.baseline(kind, a, s).final_test_acc
                   for s in cfg.seeds] for a in cfg.arms}
        test = {a: [res.baseline(kind, a, s).final_test_acc for s in cfg.seeds] for a in cfg.arms}
        smaller_gap = compare_means(gap["plain"], gap["bn"], 0.005) > 0
        lower_test = compare_means(test["plain"], test["bn"], 0.005) > 0
        verdicts.append(MIXED if smaller_gap and lower_test else HELD if smaller_gap else NOT_HELD)
        texts.append(f"{kind.upper()}: train-test gap " + ", ".join(
            f"{ARM_LABELS[a]} {_fmt(gap[a])} (test {_fmt(test[a])})" for a in cfg.arms))
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
        max_lr = {a: largest_training_lr(res, kind, a) for a in COMPARED_ARMS}
        best = {a: min(steps_to_target(res, kind, a, lr) for lr in cfg.lrs) for a in COMPARED_ARMS}
        at_base = {a: steps_to_target(res, kind, a, cfg.base_lr) for a in COMPARED_ARMS}
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
        t_bn, t_plain = (float(np.median(timings[kind][a])) for a in COMPARED_ARMS)
        noise = max(0.05, *(_relative_iqr(timings[kind][a]) for a in COMPARED_ARMS))
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
        ics = {a: mean_ics(res, kind, a) for a in COMPARED_ARMS}
        lower = [ics["bn"][layer] < 0.9 * ics["plain"][layer] for layer in ics["bn"]]
        steps = {a: steps_to_target(res, kind, a, cfg.base_lr) for a in COMPARED_ARMS}
        faster = steps["bn"] < steps["plain"]
        verdicts.append(HELD if all(lower) and faster else NOT_HELD if not any(lower) else MIXED)
        layers = ", ".join(f"{layer.split()[0]} {_fmt(ics['bn'][layer])}/{_fmt(ics['plain'][layer])}"
                           for layer in ics["bn"])
        texts.append(f"{kind.upper()}: ICS BN/no-BN per layer {layers}; steps to "
                     f"{cfg.target_accuracy:.0%} at base LR BN {_steps_text(steps['bn'])} vs "
                     f"{_steps_text(steps['plain'])}")
    return "<br>".join(texts), combine_verdicts(verdicts)


def analyse(res: Results, timings: dict[str, dict[str, list[float]]]) -> list[ClaimRow]:
    measured = {1: claim_init_sensitivity(res), 2: claim_regularisation(res), 3: claim_learning_rate(res),
                4: claim_overhead(timings, res.config), 5: claim_covariate_shift(res)}
    return [ClaimRow(n, CLAIMS[n], *measured[n], CLAIM_PLOTS[n]) for n in CLAIMS]
