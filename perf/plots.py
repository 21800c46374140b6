"""The figures of the sweep and of the training step. Each names its device, timing method and what its bars
or points mean, so it reads without the text; CPU timings (interpreter or reference) get a red watermark:
they are not performance."""

import math
from collections import defaultdict
from pathlib import Path

from .constants import MODES
from .summary import backends, config_label, geomean, is_performance, measured, timings, varies

MODE_TITLES = {"fwd": "forward (training)", "bwd": "backward", "fwd_bwd": "forward + backward",
               "eval": "forward (eval)"}
KIND_TITLES = {"e2e": "end to end (host stalls included)", "device": "device only (no host time)"}
NOT_PERFORMANCE = "CPU / interpreter timings: NOT performance"
COLORS = {"tritonbn": "tab:orange", "eager": "tab:blue", "compile": "tab:green", "flag_gems": "tab:purple",
          "apex": "tab:brown"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, rect=(0, 0, 1, 1), rows=None) -> bool:
    """Lay out, write and close a figure (with the device/timing note when ``rows`` are given)."""
    if rows is not None:
        figure_note(fig, rows)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return True


def figure_note(fig, rows, timing: str | None = None) -> None:
    """Device and timing method at the foot of a figure; a red warning when the timings are not GPU ones."""
    devices = ", ".join(sorted({r["device"] for r in rows}))
    timing = timing or ", ".join(sorted(timings(rows)))
    fig.text(0.01, 0.005, f"device: {devices}   timing: {timing}", fontsize=8, color="0.3", ha="left",
             va="bottom")
    if not is_performance(rows):
        size = min(22.0, 2.0 * fig.get_figwidth())  # the watermark must fit the figure's width
        fig.text(0.5, 0.5, NOT_PERFORMANCE, fontsize=size, color="red", alpha=0.3, ha="center", va="center",
                 rotation=15, weight="bold")


def speedup_axis(ax) -> None:
    """Log scale with ticks at powers of two, written as 0.5x, 1x, 2x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(LogLocator(base=2))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.5), max(high, 2.0))


def _offsets(count: int, width: float = 0.8) -> tuple[list[float], float]:
    """x offsets of `count` bars side by side within one group, and the bar width."""
    bar = width / count
    return [(i - (count - 1) / 2) * bar for i in range(count)], bar


def plot_speedup(rows, mode: str, path: Path, kind: str = "e2e") -> bool:
    """Bars: each backend's speedup over eager per shape, one panel per dtype x layout."""
    column = f"{kind}_speedup_vs_eager"
    rows = [r for r in measured(rows, kind) if r["mode"] == mode and r["backend"] != "eager"
            and math.isfinite(r[column])]
    if not rows:
        return False
    plt = pyplot()
    panels = sorted({(r["dtype"], r["layout"]) for r in rows})
    names = backends(rows)
    vary_act, vary_res = varies(rows)
    labels_all = {config_label(r, vary_act, vary_res) for r in rows}
    width = max(8.0, 0.45 * len(labels_all) * max(1, len(names)) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.6 * len(panels) + 0.8), squeeze=False)
    offsets, bar_width = _offsets(len(names))
    for ax, (dtype, layout) in zip(axes[:, 0], panels):
        panel = [r for r in rows if (r["dtype"], r["layout"]) == (dtype, layout)]
        labels = list(dict.fromkeys(config_label(r, vary_act, vary_res) for r in panel))
        for offset, backend in zip(offsets, names):
            by_label = {config_label(r, vary_act, vary_res): r[column] for r in panel if r["backend"] == backend}
            xs = [j + offset for j, lab in enumerate(labels) if lab in by_label]
            ys = [by_label[lab] for lab in labels if lab in by_label]
            # Bars grow from 1 (eager) up or down, so a slowdown reads as a bar below the line.
            ax.bar(xs, [y - 1 for y in ys], bar_width, bottom=1, label=backend, color=COLORS.get(backend))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="eager (= 1)")
        speedup_axis(ax)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("speedup over eager\n(higher is better)")
        ax.set_title(f"{dtype}, {layout}", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="y", alpha=0.3, which="both")
    methods = ", ".join(sorted({r["device_method"] for r in rows})) if kind == "device" else None
    fig.suptitle(f"Speedup over eager PyTorch (F.batch_norm + activation): {MODE_TITLES[mode]}\n"
                 f"{KIND_TITLES[kind]}", fontsize=11)
    figure_note(fig, rows, f"{', '.join(sorted(timings(rows)))}; device time: {methods}" if methods else None)
    return save(fig, path, rect=(0, 0.03, 1, 1))


def plot_overhead(rows, dtype: str, layout: str, path: Path) -> bool:
    """Per mode, shape and backend: a bar as tall as the e2e time, split into the device time (solid) and
    the rest (hatched: host work the device waited for), with the host issue time marked."""
    rows = [r for r in measured(rows) if (r["dtype"], r["layout"]) == (dtype, layout)
            and math.isfinite(r["device_ms"]) and math.isfinite(r["host_us"])]
    if not rows:
        return False
    plt = pyplot()
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    names = backends(rows)
    vary_act, vary_res = varies(rows)
    labels = list(dict.fromkeys(config_label(r, vary_act, vary_res) for r in rows))
    width = max(8.0, 0.3 * len(labels) * len(names) + 2.5)
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.4 * len(modes) + 1.0), squeeze=False)
    offsets, bar_width = _offsets(len(names))
    # Bars on a log axis start at its lower edge: put it well below the smallest time, so that none vanishes.
    floor = min(min(r["device_ms"], r["host_us"] / 1e3) for r in rows) / 3
    for ax, mode in zip(axes[:, 0], modes):
        for offset, backend in zip(offsets, names):
            picked = {config_label(r, vary_act, vary_res): r for r in rows
                      if r["mode"] == mode and r["backend"] == backend}
            xs = [j + offset for j, lab in enumerate(labels) if lab in picked]
            chosen = [picked[lab] for lab in labels if lab in picked]
            device = [r["device_ms"] for r in chosen]
            rest = [max(r["e2e_ms"] - r["device_ms"], 0.0) for r in chosen]
            color = COLORS.get(backend)
            ax.bar(xs, device, bar_width, color=color, label=backend)
            ax.bar(xs, rest, bar_width, bottom=device, color=color, alpha=0.35, hatch="//", edgecolor=color)
            ax.scatter(xs, [r["host_us"] / 1e3 for r in chosen], marker="_", s=160, color="black", zorder=3)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ms per call (log)")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS.get(b), label=b) for b in names] + [
        Patch(facecolor="white", edgecolor="0.3", label="device time (solid)"),
        Patch(facecolor="0.85", edgecolor="0.3", hatch="//", label="rest of e2e: host stalls"),
        Line2D([], [], color="black", marker="_", linestyle="", markersize=12, label="host issue time per call")]
    top = 1 - 0.75 / fig.get_figheight()  # the title and the legend's row take the top 0.75 inch
    fig.suptitle(f"Where the time goes, {dtype} {layout}: bar height = e2e time per call (lower is better)",
                 y=0.998, fontsize=11)
    fig.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, top + 0.4 / fig.get_figheight()),
               ncols=len(handles), frameon=False)
    methods = ", ".join(sorted({r["device_method"] for r in rows}))
    figure_note(fig, rows, f"{', '.join(sorted(timings(rows)))}; device time: {methods}")
    return save(fig, path, rect=(0, 0.03, 1, top))


def bandwidth_kind(rows) -> str:
    """The time effective bandwidth is computed from: device time where the CSV has it (a host-bound call
    says nothing about its kernels), else e2e."""
    return "device" if any(math.isfinite(r["device_gbps"]) for r in measured(rows, "device")) else "e2e"


def plot_bandwidth(rows, path: Path) -> bool:
    """Effective GB/s (minimum-bytes model) against the tensor size, under the copy-bandwidth roofline,
    from the time `bandwidth_kind` picks."""
    kind = bandwidth_kind(rows)
    column = "device_gbps" if kind == "device" else "gbps"
    rows = [r for r in measured(rows, kind) if math.isfinite(r[column])]
    if not rows:
        return False
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.8), squeeze=False, sharey=True)
    copy = geomean(r["copy_gbps"] for r in rows)
    for ax, mode in zip(axes[0], modes):
        for backend in backends(rows):
            pts = [r for r in rows if r["mode"] == mode and r["backend"] == backend]
            ax.scatter([r["min_bytes"] / 2**20 for r in pts], [r[column] for r in pts], s=14, alpha=0.75,
                       label=backend, color=COLORS.get(backend))
        ax.axhline(copy, color="red", linestyle="--", linewidth=1.2, label=f"device copy: {copy:.3g} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # within a decade they would print over each other
        ax.set_xlabel("minimum bytes moved (MiB)")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"effective bandwidth (GB/s)\nminimum bytes / {kind} time")
    handles, labels = axes[0][0].get_legend_handles_labels()
    height = fig.get_figheight()
    fig.suptitle("Achieved bandwidth against the copy-bandwidth roofline (higher is better)\n"
                 f"from {KIND_TITLES[kind]}", y=0.998, fontsize=11)
    # The legend's row below the title's two lines (0.6 inch); tight_layout leaves room for the title only.
    fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.6 / height),
               ncols=len(labels), frameon=False)
    return save(fig, path, rect=(0, 0.04, 1, 1 - 0.3 / height), rows=rows)


def plot_scaling(rows, path: Path) -> bool:
    """e2e time against N*H*W for the scaling preset, log-log, one line per backend (and dtype, layout)."""
    rows = [r for r in measured(rows) if r["preset"] == "scaling"]
    if not rows:
        return False
    plt = pyplot()
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.4), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        lines = defaultdict(list)
        for r in rows:
            if r["mode"] == mode:
                lines[(r["backend"], r["dtype"], r["layout"])].append((r["reduced"], r["e2e_ms"]))
        for (backend, dtype, layout), pts in sorted(lines.items()):
            pts.sort()
            style = "-" if dtype == "fp32" else "--"
            ax.plot(*zip(*pts), style, marker="o", markersize=3, color=COLORS.get(backend),
                    label=f"{backend} {dtype} {layout}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N*H*W (values per channel)")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(alpha=0.3, which="both")
    channels = ", ".join(sorted({str(int(r["channels"])) for r in rows}))
    axes[0][0].set_ylabel("e2e time (ms)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Time against size, C = {channels} (lower is better)")
    return save(fig, path, rect=(0, 0.04, 1, 1), rows=rows)


def _byte_unit(values) -> tuple[float, str]:
    largest = max(values, default=0.0)
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "bytes"


def plot_memory(rows, path: Path) -> bool:
    """Per shape and backend: extra bytes saved for backward, and peak allocation during fwd+bwd (CUDA)."""
    rows = [r for r in rows if r["ok"]]
    combo = min(((r["dtype"], r["layout"]) for r in rows if r["mode"] == "fwd"), default=None)
    if combo is None:
        return False
    plt = pyplot()
    rows = [r for r in rows if (r["dtype"], r["layout"]) == combo]
    names = backends(rows)
    peak_mode = "fwd_bwd" if any(r["mode"] == "fwd_bwd" for r in rows) else "fwd"
    metrics = [("saved_extra_bytes", "fwd", "saved for backward, beyond tensors the network holds anyway")]
    if any(r["mode"] == peak_mode and math.isfinite(r["peak_mem_bytes"]) for r in rows):
        metrics.append(("peak_mem_bytes", peak_mode, f"peak extra allocation during {peak_mode}"))
    labels = list(dict.fromkeys(r["shape"] for r in rows if r["mode"] == "fwd"))
    fig, axes = plt.subplots(len(metrics), 1, squeeze=False,
                             figsize=(max(8.0, 0.5 * len(labels) * len(names) + 2), 3.8 * len(metrics) + 0.8))
    offsets, bar_width = _offsets(len(names))
    for ax, (column, mode, title) in zip(axes[:, 0], metrics):
        # Over activations and residual settings, the largest value: memory plans for the worst case.
        worst = defaultdict(float)
        for r in rows:
            if r["mode"] == mode and math.isfinite(r[column]):
                worst[r["backend"], r["shape"]] = max(worst[r["backend"], r["shape"]], r[column])
        scale, unit = _byte_unit(worst.values())
        for offset, backend in zip(offsets, names):
            picked = [(j, worst[backend, s]) for j, s in enumerate(labels) if (backend, s) in worst]
            ax.bar([j + offset for j, _ in picked], [v / scale for _, v in picked], bar_width, label=backend,
                   color=COLORS.get(backend))
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"{unit} (lower is better)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    note = "" if len(metrics) > 1 else "; peak allocation is measured on CUDA only"
    fig.suptitle(f"Memory per backend and shape ({combo[0]}, {combo[1]}{note})")
    return save(fig, path)


def plot_step(rows, path: Path) -> bool:
    """Per precision and batch, one bar per variant: the training step's time, split into the rest of the
    network (grey) and what batch norm and its activation add (coloured), with their share and the speedup."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False
    plt = pyplot()
    precisions = list(dict.fromkeys(f"{r['dtype']}-{r['layout']}" for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = max(8.0, 1.2 * len(variants) * len(batches) + 1.0)
    fig, axes = plt.subplots(len(precisions), len(batches), squeeze=False,
                             figsize=(width, 3.6 * len(precisions) + 1.4))
    for (i, precision), (j, batch) in ((p, b) for p in enumerate(precisions) for b in enumerate(batches)):
        ax = axes[i][j]
        panel = {r["variant"]: r for r in rows if f"{r['dtype']}-{r['layout']}" == precision and r["batch"] == batch}
        for x, variant in enumerate(variants):
            r = panel.get(variant)
            if r is None or r["status"] != "ok":
                why = "not run" if r is None else r["status"].split(":")[0]
                ax.text(x, 0.03, why, transform=ax.get_xaxis_transform(), rotation=90, ha="center", va="bottom",
                        fontsize=8, color="0.4")
                continue
            rest, bn_act = r["without_bn_act_ms"], max(r["bn_act_ms"], 0.0)
            color = COLORS["tritonbn"] if r["fused"] else COLORS["eager"]
            ax.bar(x, rest, 0.7, color="0.75")
            ax.bar(x, bn_act, 0.7, bottom=rest, color=color)
            ax.text(x, rest + bn_act, f"{r['bn_act_share_pct']:.0f}%\n{r['speedup_vs_eager']:.2f}x", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(variants) - 0.4)  # room for a skipped variant's label at either end
        ax.set_title(f"{precision}, batch {batch}", fontsize=10)
        ax.set_ylabel("ms per training step")
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color="0.75", label="network without BN+act (identity)"),
               Patch(color=COLORS["eager"], label="BN+act, PyTorch"),
               Patch(color=COLORS["tritonbn"], label="BN+act, tritonbn.fuse")]
    top = 1 - 0.8 / fig.get_figheight()  # two title lines and the legend's row take the top 0.8 inch
    fig.suptitle(f"Training step of {ok[0]['model']} (lower is better)\nabove each bar: BN+act's share of the "
                 "step, speedup over eager", y=0.998, fontsize=10)
    fig.legend(handles=handles, fontsize=8, loc="upper center", ncols=3, frameon=False,
               bbox_to_anchor=(0.5, top + 0.3 / fig.get_figheight()))
    figure_note(fig, rows)
    return save(fig, path, rect=(0, 0.03, 1, top))
