"""The impact study's written results: impact.md (the claim table, the verdict rules, the settings and the
command that reproduces the run) and results.json (every run's numbers). The figures are `plots`'."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from .claims import NOISE_RULE, RULES, ClaimRow
from .config import StudyConfig
from .models import CNN_WIDTHS, MLP_WIDTHS
from .training import RunResult


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
             f"--dropout {config.dropout:g}"]
    return " ".join(parts)


def render_report(rows: Sequence[ClaimRow], config: StudyConfig, info: StudyInfo) -> str:
    """impact.md: the claim table, the verdict rules, the settings and the command that reproduces it."""
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
