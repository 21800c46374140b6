"""PNG figures of the batch-norm impact study; one figure per claim (`claims.CLAIM_PLOTS` says which; claim 5b
has the intervention and the loss landscape) plus the training curves. Every figure has one panel per model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines or over ssh

import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import numpy as np  # noqa: E402

from .claims import Results, mean_ics, steps_per_seed  # noqa: E402
from .landscape import LANDSCAPE_MEASURES  # noqa: E402
from .models import ARM_LABELS, COMPARED_ARMS, INTERVENTION_ARMS  # noqa: E402

ARM_COLOURS = {"bn": "tab:blue", "plain": "tab:orange", "dropout": "tab:green", "noisy": "tab:red"}
LAYER_STYLES = ("-", "--", ":", "-.")


def _panels(count: int, rows: int = 1, height: float = 3.6):
    fig, axes = plt.subplots(rows, count, figsize=(5.2 * count, height * rows), squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(res: Results, path: Path) -> None:
    """Training loss and test accuracy over steps for the baseline runs, one thin line per seed."""
    cfg = res.config
    fig, axes = _panels(len(cfg.models), rows=2, height=3.2)
    for col, kind in enumerate(cfg.models):
        loss_ax, acc_ax = axes[0, col], axes[1, col]
        for arm in (*cfg.arms, "noisy"):
            for i, seed in enumerate(cfg.seeds):
                run = res.baseline(kind, arm, seed)
                label = ARM_LABELS[arm] if i == 0 else None
                loss_ax.plot(run.eval_steps, run.train_loss, color=ARM_COLOURS[arm], lw=1.2, label=label)
                acc_ax.plot(run.eval_steps, run.test_acc, color=ARM_COLOURS[arm], lw=1.2, label=label)
        loss_ax.set(title=f"{kind.upper()}: training loss (LR {cfg.base_lr:g})", ylabel="cross-entropy",
                    yscale="log")
        acc_ax.axhline(cfg.target_accuracy, color="grey", ls=":", lw=1, label="target")
        acc_ax.set(title=f"{kind.upper()}: test accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
        loss_ax.legend(fontsize=8)
        acc_ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _sweep(res: Results, path: Path, values: Sequence[float], key: str, xlabel: str, title: str) -> None:
    """Final test accuracy against a swept setting: mean over seeds, band = min to max."""
    cfg = res.config
    fig, axes = _panels(len(cfg.models))
    for ax, kind in zip(axes[0], cfg.models):
        for arm in COMPARED_ARMS:
            acc = np.array([res.final_acc(kind, arm, **{"lr": cfg.base_lr, "scale": 1.0, key: v})
                            for v in values])
            ax.plot(values, acc.mean(axis=1), "o-", color=ARM_COLOURS[arm], label=ARM_LABELS[arm])
            ax.fill_between(values, acc.min(axis=1), acc.max(axis=1), color=ARM_COLOURS[arm], alpha=0.2)
        ax.axhline(cfg.trains_threshold, color="grey", ls=":", lw=1, label="trains threshold")
        ax.set(title=f"{kind.upper()}: {title}", xscale="log", xlabel=xlabel, ylabel="final test accuracy",
               ylim=(0, 1.02))
        ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def plot_generalisation(res: Results, path: Path) -> None:
    """Train-test accuracy gap and test accuracy of each arm at the baseline (error bar = seed std)."""
    cfg = res.config
    arms = cfg.arms
    fig, axes = _panels(2)
    width = 0.8 / len(arms)
    x = np.arange(len(cfg.models))
    for i, arm in enumerate(arms):
        runs = [[res.baseline(kind, arm, s) for s in cfg.seeds] for kind in cfg.models]
        gap = np.array([[r.final_train_acc - r.final_test_acc for r in rs] for rs in runs])
        test = np.array([[r.final_test_acc for r in rs] for rs in runs])
        for ax, values in zip(axes[0], (gap, test)):
            ax.bar(x + (i - (len(arms) - 1) / 2) * width, values.mean(axis=1), width, yerr=values.std(axis=1),
                   color=ARM_COLOURS[arm], label=ARM_LABELS[arm], capsize=3)
    labels = [k.upper() for k in cfg.models]
    axes[0, 0].set(title="train - test accuracy gap (lower = less overfitting)", ylabel="gap", xticks=x,
                   xticklabels=labels)
    lowest = min(r.final_test_acc for r in res.runs if r.spec.lr == cfg.base_lr and r.spec.init_scale == 1.0)
    axes[0, 1].set(title="test accuracy", ylabel="accuracy", xticks=x, xticklabels=labels,
                   ylim=(max(0.0, lowest - 0.05), 1.0))
    for ax in axes[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_timing(timings: dict[str, dict[str, list[float]]], path: Path, where: str) -> None:
    """Median milliseconds per training step with and without BN (error bar = interquartile range)."""
    kinds = list(timings)
    fig, axes = _panels(1)
    ax = axes[0, 0]
    x = np.arange(len(kinds))
    for i, arm in enumerate(COMPARED_ARMS):
        ms = [np.percentile(np.array(timings[k][arm]) * 1e3, [25, 50, 75]) for k in kinds]
        median = np.array([m[1] for m in ms])
        spread = np.array([[m[1] - m[0] for m in ms], [m[2] - m[1] for m in ms]])
        ax.bar(x + (i - 0.5) * 0.4, median, 0.4, yerr=spread, color=ARM_COLOURS[arm], label=ARM_LABELS[arm],
               capsize=3)
    ax.set(title=f"time per training step\n{where}", ylabel="ms / step", xticks=x,
           xticklabels=[k.upper() for k in kinds])
    ax.legend(fontsize=8)
    _save(fig, path)


def _arm_and_layer_legends(ax, arms: Sequence[str], layers: Sequence[str]) -> None:
    """Two legends: colour = arm, line style = layer."""
    from matplotlib.lines import Line2D

    arm_handles = [Line2D([], [], color=ARM_COLOURS[a], label=ARM_LABELS[a]) for a in arms]
    layer_handles = [Line2D([], [], color="black", ls=style, label=layer) for style, layer in zip(LAYER_STYLES, layers)]
    ax.add_artist(ax.legend(handles=arm_handles, fontsize=8, loc="upper right"))
    ax.legend(handles=layer_handles, fontsize=8, loc="lower left")


def plot_ics(res: Results, path: Path) -> None:
    """Drift of each layer's input between consecutive captures over training, mean over seeds."""
    cfg = res.config
    fig, axes = _panels(len(cfg.models), height=4.2)
    for ax, kind in zip(axes[0], cfg.models):
        for arm in INTERVENTION_ARMS:
            runs = [res.baseline(kind, arm, s) for s in cfg.seeds]
            for style, layer in zip(LAYER_STYLES, runs[0].ics):
                length = min(len(r.ics[layer]) for r in runs)
                drift = np.mean([r.ics[layer][:length] for r in runs], axis=0)
                ax.plot(runs[0].eval_steps[:length], drift, ls=style, color=ARM_COLOURS[arm])
        averages = {arm: np.nanmean(list(mean_ics(res, kind, arm).values())) for arm in INTERVENTION_ARMS}
        ax.set(title=f"{kind.upper()}: ICS, mean over layers: BN {averages['bn']:.3f}, no BN "
                     f"{averages['plain']:.3f}, noisy BN {averages['noisy']:.3f}",
               xlabel="step", ylabel="input drift per capture (W1 / std)", yscale="log")
        ax.title.set_fontsize(9)
        _arm_and_layer_legends(ax, INTERVENTION_ARMS, list(res.baseline(kind, "bn", cfg.seeds[0]).ics))
    _save(fig, path)


def plot_intervention(res: Results, path: Path) -> None:
    """Claim 5b at a glance: each arm's ICS per layer (top) and its steps to the target accuracy (bottom)."""
    cfg = res.config
    fig, axes = _panels(len(cfg.models), rows=2, height=3.4)
    width = 0.8 / len(INTERVENTION_ARMS)
    for col, kind in enumerate(cfg.models):
        ics_ax, steps_ax = axes[0, col], axes[1, col]
        ics = {a: mean_ics(res, kind, a) for a in INTERVENTION_ARMS}
        steps = {a: steps_per_seed(res, kind, a) for a in INTERVENTION_ARMS}
        layers = list(ics["bn"])
        for i, arm in enumerate(INTERVENTION_ARMS):
            ics_ax.bar(np.arange(len(layers)) + (i - 1) * width, [ics[arm][layer] for layer in layers], width,
                       color=ARM_COLOURS[arm], label=ARM_LABELS[arm])
            steps_ax.bar(i, np.mean(steps[arm]), 0.6, color=ARM_COLOURS[arm], alpha=0.6)
            steps_ax.plot([i] * len(steps[arm]), steps[arm], "o", color="black", ms=4,
                          label="one seed" if i == 0 else None)
        ics_ax.set(title=f"{kind.upper()}: ICS per layer (mean over training and seeds)", yscale="log",
                   ylabel="input drift (W1 / std)", xticks=range(len(layers)), xticklabels=layers)
        ics_ax.legend(fontsize=8)
        never = cfg.steps + cfg.eval_every
        if any(never in s for s in steps.values()):
            steps_ax.axhline(never, color="grey", ls=":", lw=1, label="never reached (counted as)")
        steps_ax.set(title=f"{kind.upper()}: steps to {cfg.target_accuracy:.0%} test accuracy (LR {cfg.base_lr:g})",
                     ylabel="steps", xticks=range(len(INTERVENTION_ARMS)),
                     xticklabels=[ARM_LABELS[a] for a in INTERVENTION_ARMS],
                     ylim=(0, 1.2 * max(max(s) for s in steps.values())))
        steps_ax.legend(fontsize=8)
    _save(fig, path)


def plot_landscape(res: Results, path: Path) -> None:
    """Loss landscape along the training path (as in the paper's Figure 4): per probe, the band between the
    smallest and largest loss, and gradient change, over the step sizes; and the effective beta-smoothness.
    Each is the mean over seeds."""
    cfg = res.config
    fig, axes = _panels(len(cfg.models), rows=3, height=3.0)
    multiples = "-".join(f"{m:g}" for m in (cfg.landscape_step_multiples[0], cfg.landscape_step_multiples[-1]))
    for col, kind in enumerate(cfg.models):
        for arm in INTERVENTION_ARMS:
            traces = [res.baseline(kind, arm, s).landscape for s in cfg.seeds]
            length = min(len(t.steps) for t in traces)
            steps = traces[0].steps[:length]
            colour = ARM_COLOURS[arm]
            for row, values in enumerate(("losses", "gradient_changes")):
                low = np.mean([[min(getattr(p, values)) for p in t.points[:length]] for t in traces], axis=0)
                high = np.mean([[max(getattr(p, values)) for p in t.points[:length]] for t in traces], axis=0)
                axes[row, col].fill_between(steps, low, high, color=colour, alpha=0.35, label=ARM_LABELS[arm])
            beta = np.mean([t.series("effective_beta")[:length] for t in traces], axis=0)
            axes[2, col].plot(steps, beta, color=colour, label=ARM_LABELS[arm])
        titles = (f"loss at theta - eta g, eta = {multiples} x LR", "||grad(theta - eta g) - g||, same eta",
                  LANDSCAPE_MEASURES["effective_beta"])
        ylabels = ("training loss (band = range)", "gradient change (band = range)", "max change / ||eta g||")
        for row in range(3):
            axes[row, col].set(title=f"{kind.upper()}: {titles[row]}", ylabel=ylabels[row], yscale="log")
            axes[row, col].legend(fontsize=8)
        axes[2, col].set_xlabel("training step (updates before the probe)")
    _save(fig, path)


def write_all(res: Results, timings: dict[str, dict[str, list[float]]], out_dir: Path, where: str) -> None:
    """Every figure of the study into `out_dir`; `where` names the device and BN path for the timing."""
    cfg = res.config
    plot_curves(res, out_dir / "curves.png")
    _sweep(res, out_dir / "lr_sweep.png", cfg.lrs, "lr", "learning rate (SGD, momentum "
           f"{cfg.momentum:g})", "accuracy vs learning rate")
    _sweep(res, out_dir / "init_sweep.png", cfg.init_scales, "scale", "init scale (x default weights)",
           f"accuracy vs init scale (LR {cfg.base_lr:g})")
    plot_generalisation(res, out_dir / "generalisation.png")
    plot_timing(timings, out_dir / "timing.png", where)
    plot_ics(res, out_dir / "ics.png")
    plot_intervention(res, out_dir / "intervention.png")
    plot_landscape(res, out_dir / "landscape.png")
