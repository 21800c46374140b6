"""The impact study's written results: impact.md (the claim table, the verdict rules, the settings and the
command that reproduces the run) and results.json (every run's numbers). The figures are `plots`'."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from .claims import NOISE_RULE, RULES, ClaimRow
from .config import StudyConfig
from .landscape import LANDSCAPE_MEASURES
from .models import ARM_LABELS, CNN_WIDTHS, INTERVENTION_ARMS, MLP_WIDTHS
from .training import RunResult

PAPER = ('Santurkar, Tsipras, Ilyas and Madry, "How Does Batch Normalization Help Optimization?" (NeurIPS 2018, '
         "arXiv:1805.11604)")


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


def write_results_json(file: Path, config: StudyConfig, runs: Sequence[RunResult], timings: dict,
                       info: StudyInfo) -> None:
    """The settings, how the study ran, the step timings and every run (its spec and records, flattened)."""
    payload = {"config": dataclasses.asdict(config), **dataclasses.asdict(info), "timings_s_per_step": timings,
               "runs": [{**dataclasses.asdict(r.spec), **{k: v for k, v in dataclasses.asdict(r).items()
                                                          if k != "spec"}} for r in runs]}
    file.write_text(json.dumps(payload, indent=1))


def reproduce_command(config: StudyConfig, info: StudyInfo) -> str:
    """The `tritonbn-perf impact` command line that reruns this study with the same settings."""
    parts = ["tritonbn-perf impact", *(["--quick"] if config.preset == "quick" else []),
             f"--device {info.device}", *(["--kernels"] if info.kernels else []),
             "--seeds " + " ".join(map(str, config.seeds)), f"--steps {config.steps}",
             "--models " + " ".join(config.models), f"--base-lr {config.base_lr:g}",
             f"--dropout {config.dropout:g}", f"--noise-dose {config.noise_dose:g}"]
    return " ".join(parts)


def intervention_section(config: StudyConfig, landscape: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Lines of impact.md on claim 5b: the noise, where the study follows the paper and where it does not, how
    to read the verdict, and the loss landscape per model and arm (`landscape[kind][arm][measure]`)."""
    noise = config.noise
    table = ["| model | arm | " + " | ".join(LANDSCAPE_MEASURES.values()) + " |", "|---|---|---|---|---|"]
    table += [f"| {kind.upper()} | {ARM_LABELS[arm]} | " + " | ".join(
        f"{landscape[kind][arm][m]:.3g}" for m in LANDSCAPE_MEASURES) + " |"
        for kind in config.models for arm in INTERVENTION_ARMS]
    multiples = ", ".join(f"{m:g}" for m in config.landscape_step_multiples)
    return [
        "## Claim 5 by intervention (row 5b)", "",
        f"Row 5a sets ICS beside training speed: a correlation, which cannot show that BN works *because* of lower "
        f"ICS. Row 5b intervenes, as {PAPER} do: a third arm, BN + injected noise, raises ICS on purpose after "
        "every BN, and the question is whether BN's speed survives it.", "",
        f"- **The noise** (dose {config.noise_dose:g}): {noise.describe()}. Drawn anew at every training step "
        "(every training-mode forward, the ICS probe's included) for every unit; a unit is a feature (MLP) or "
        "a channel, whose samples and positions share the unit's shift and scale centres (CNN). Between each "
        "BN and its ReLU; in evaluation the noise is replaced by its expectation (scale "
        f"{noise.mean_scale:g}, shift 0), as dropout is.",
        "- **As in the paper**: the noise model is its Algorithm 1 (Appendix A.2.1), at dose 1 with its values "
        "n_mu = 0.5, n_sigma = 1.25, r_mu = r_sigma = 0.1, on the batch-normalized activation before the "
        "ReLU. The landscape measures are its Section 3.2 / Figure 4 ones, along the gradient at step sizes of "
        f"{multiples} x the LR (its VGG range is [1/2, 4] x the LR, Appendix A.2.2).",
        "- **Not as in the paper**: two small nets on 8x8 digits with SGD + momentum for a few hundred steps "
        "(the paper: VGG on CIFAR-10, plain SGD, 15k steps); r_sigma read as a standard deviation (it writes "
        "N(sigma, r_sigma)); the noise's expectation at evaluation, and speed as steps to a *test* accuracy "
        "(the paper plots training accuracy and does not say what its noisy net does at test time); ICS is "
        "this study's drift measure of row 5a (the paper shows activation histograms, and its gradient-based "
        "ICS of Definition 2.1 is not measured here); the landscape is probed every "
        f"{config.eval_every} updates along the raw mini-batch gradient (training follows the momentum "
        "buffer), with the injected noise held at one draw during a probe so that it measures the landscape, "
        "not the noise.",
        "- **Reading the verdict**: \"did not hold\" is the paper's argument: a net with no-BN's ICS that still "
        "trains as fast as BN shows that BN's speed does not come from lower ICS. \"held\" is weaker "
        "evidence: the noise also corrupts every activation, so a slowdown may come from the noise rather "
        "than from the covariate shift it causes.", "",
        "### Loss landscape along the training path", "",
        "Median over a baseline run's probes, mean over seeds (the probes over training are in "
        "[landscape.png](landscape.png)). Lower is smoother: a loss that varies less, and a gradient that "
        "stays more predictive, along the gradient direction.", "", *table, ""]


def render_report(rows: Sequence[ClaimRow], config: StudyConfig, info: StudyInfo,
                  landscape: dict[str, dict[str, dict[str, float]]]) -> str:
    """impact.md: the claim table, the verdict rules, claim 5b's intervention and loss landscape, the settings
    and the command that reproduces it."""
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
                  f"no-BN + dropout p={config.dropout:g} after each hidden layer; noisy BN arm: weight layers "
                  "without bias + tritonbn.BatchNormAct (identity) + injected noise + ReLU",
        "BN path": f"{info.bn_path} on {info.device}",
        "ran on": f"{info.workers} worker process(es) x {info.threads} torch thread(s); the timing runs alone "
                  f"in the main process with {info.threads} thread(s)",
        "training": f"SGD momentum {config.momentum:g}, batch {config.batch_size}, {config.steps} steps, "
                    f"base LR {config.base_lr:g}, evaluation and ICS capture every {config.eval_every} steps; a run "
                    "stops when its loss is no longer finite, and non-finite logits count as wrong answers",
        "landscape": "on the baseline runs of BN, no-BN and noisy BN, before the first update and every "
                     f"{config.eval_every} updates, on that step's mini-batch in training mode (BN running stats "
                     "and the injected noise held): g = the gradient at theta; for eta in "
                     + ", ".join(f"{m:g}" for m in config.landscape_step_multiples) + " x the LR, the loss and "
                     "gradient at theta - eta g; loss range = max - min of those losses, gradient-change range = "
                     "max - min of ||grad(theta - eta g) - g||, effective beta-smoothness = max of "
                     "||grad(theta - eta g) - g|| / ||eta g||",
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
             *intervention_section(config, landscape), "## Settings", "",
             *[f"- **{k}**: {v}" for k, v in settings.items()], "", "## Reproduce", "", "```",
             reproduce_command(config, info), "```", ""]
    return "\n".join(lines)
