"""The five claims (claim 5 twice: by correlation and by intervention), the figures measured for each, and the
rules that turn those figures into a verdict.

Every function here reads finished runs (`Results`) or timings: nothing trains. A claim's figures and
verdict are computed per model, and the models' verdicts are combined by `combine_verdicts`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from .config import StudyConfig
from .landscape import LANDSCAPE_MEASURES
from .models import ARM_LABELS, COMPARED_ARMS, INTERVENTION_ARMS
from .training import RunResult

HELD, NOT_HELD, MIXED, INCONCLUSIVE = "held", "did not hold", "mixed", "inconclusive"

# Claim 5 has two rows: 5a sets ICS beside training speed (a correlation), 5b intervenes on ICS.
CLAIMS = {
    "1": "BN makes training less sensitive to initialisation",
    "2": "BN acts as a regulariser (smaller generalisation gap, less need for dropout)",
    "3": "BN allows higher learning rates and speeds up convergence",
    "4": "BN adds computational overhead",
    "5a": "BN works by reducing internal covariate shift (correlation: ICS beside speed)",
    "5b": "BN works by reducing internal covariate shift (intervention: noise injected after BN raises ICS)",
}
# The figures of `plots.write_all` that show each claim's numbers; the report links them.
CLAIM_PLOTS = {"1": ("init_sweep.png",), "2": ("generalisation.png",), "3": ("lr_sweep.png", "curves.png"),
               "4": ("timing.png",), "5a": ("ics.png",), "5b": ("intervention.png", "landscape.png", "ics.png")}
RULES = {
    "1": "held if BN's spread (std of final test accuracy over the init scales, per seed) is lower than "
         "no-BN's by more than the noise floor; otherwise did not hold.",
    "2": "held if BN's train-test accuracy gap is smaller than no-BN's by more than the noise floor and BN's "
         "test accuracy is not lower beyond it; mixed if the gap is smaller but test accuracy is lower "
         "(less overfitting from fitting less); otherwise did not hold. Dropout is shown for reference.",
    "3": "held if BN both trains at a larger learning rate (largest grid LR with mean final test accuracy "
         ">= the trains-threshold) and reaches the target accuracy in fewer steps (best over LRs, all seeds "
         "reaching it); did not hold if neither; mixed if one.",
    "4": "held if a BN training step is slower than a no-BN step by more than max(5%, timing noise = the "
         "larger relative interquartile range of the two); otherwise did not hold.",
    "5a": "held if BN's ICS is below 0.9x no-BN's in every measured layer and BN reaches the target accuracy "
          "in fewer steps at the base LR; did not hold if BN's ICS is not below 0.9x no-BN's in any layer; "
          "mixed otherwise.",
    "5b": "from the baseline runs (base LR, init scale 1) of BN, no-BN and noisy BN, with steps to the target "
          "accuracy per seed (a seed that never reaches it counts as the run's steps + one evaluation "
          "interval) compared under the noise floor: inconclusive if BN is not faster than no-BN (no speed "
          "to explain) or if noisy BN's ICS is below no-BN's in any measured layer (the noise did not raise "
          "ICS to no-BN's level); otherwise did not hold if noisy BN is faster than no-BN and not slower "
          "than BN (BN's speed survives no-BN's ICS); held if noisy BN is slower than BN and not faster than "
          "no-BN (the noise took BN's speed away); inconclusive if it lands in between (slower than BN, "
          "faster than no-BN) or cannot be told apart from either.",
}
NOISE_RULE = ("noise floor: a difference of means counts only if it exceeds max(margin, 2 x standard error "
              "of the difference over seeds); margins are 0.02 (claim 1) and 0.005 (claim 2) in accuracy, "
              "and one evaluation interval (claim 5b), the resolution of steps to target.")


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
    number: str
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


def landscape_summary(res: Results, kind: str, arm: str) -> dict[str, float]:
    """Per landscape measure: the median over a baseline run's probes, averaged over the seeds."""
    traces = [res.baseline(kind, arm, s).landscape for s in res.config.seeds]
    return {m: float(np.mean([np.nanmedian(t.series(m)) for t in traces])) for m in LANDSCAPE_MEASURES}


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


def steps_per_seed(res: Results, kind: str, arm: str) -> list[float]:
    """Steps to the target accuracy of each seed's baseline run; a seed that never reaches it counts as the
    run's steps + one evaluation interval, the earliest evaluation it could have reached it at."""
    cfg = res.config
    reached = (res.baseline(kind, arm, s).steps_to(cfg.target_accuracy) for s in cfg.seeds)
    return [float(cfg.steps + cfg.eval_every if step is None else step) for step in reached]


def intervention_verdict(ics_raised: bool, steps: dict[str, Sequence[float]], margin: float) -> str:
    """Claim 5b's rule (RULES["5b"]) on per-seed steps to target of the "bn", "plain" and "noisy" arms."""
    if compare_means(steps["plain"], steps["bn"], margin) <= 0 or not ics_raised:
        return INCONCLUSIVE
    faster_than_plain = compare_means(steps["plain"], steps["noisy"], margin) > 0
    slower_than_bn = compare_means(steps["noisy"], steps["bn"], margin) > 0
    if faster_than_plain and not slower_than_bn:
        return NOT_HELD
    if slower_than_bn and not faster_than_plain:
        return HELD
    return INCONCLUSIVE  # between the two, or told apart from neither


def share_of_captures_at_or_above(res: Results, kind: str, arm: str, other: str) -> float:
    """Fraction of the ICS captures (over layers and seeds, baseline runs) at which `arm`'s input drift is at
    least `other`'s: the mean over the run can hide that one arm's drift is a transient and the other's steady."""
    at_or_above = []
    for seed in res.config.seeds:
        drift, reference = res.baseline(kind, arm, seed).ics, res.baseline(kind, other, seed).ics
        at_or_above += [a >= b for layer in drift for a, b in zip(drift[layer], reference[layer])]
    return float(np.mean(at_or_above)) if at_or_above else math.nan


def claim_intervention(res: Results) -> tuple[str, str]:
    cfg, texts, verdicts = res.config, [], []
    for kind in cfg.models:
        ics = {a: mean_ics(res, kind, a) for a in INTERVENTION_ARMS}
        raised = all(ics["noisy"][layer] >= ics["plain"][layer] for layer in ics["plain"])
        steps = {a: steps_per_seed(res, kind, a) for a in INTERVENTION_ARMS}
        verdicts.append(intervention_verdict(raised, steps, cfg.eval_every))
        layers = ", ".join(f"{layer.split()[0]} " + "/".join(_fmt(ics[a][layer]) for a in ("noisy", "plain", "bn"))
                           for layer in ics["plain"])
        share = share_of_captures_at_or_above(res, kind, "noisy", "plain")
        texts.append(f"{kind.upper()}: ICS noisy BN/no-BN/BN per layer {layers} (noisy BN's at or above no-BN's "
                     f"at {share:.0%} of captures); steps to "
                     f"{cfg.target_accuracy:.0%} at base LR (mean of seeds) " + ", ".join(
                         f"{ARM_LABELS[a]} {_fmt(steps[a], 0)}" for a in ("noisy", "bn", "plain")))
    return "<br>".join(texts), combine_verdicts(verdicts)


def analyse(res: Results, timings: dict[str, dict[str, list[float]]]) -> list[ClaimRow]:
    measured = {"1": claim_init_sensitivity(res), "2": claim_regularisation(res), "3": claim_learning_rate(res),
                "4": claim_overhead(timings, res.config), "5a": claim_covariate_shift(res),
                "5b": claim_intervention(res)}
    return [ClaimRow(n, CLAIMS[n], *measured[n], CLAIM_PLOTS[n]) for n in CLAIMS]
