"""The figures of the sweep and of the training step. Each names its device, timing method and what its bars
or points mean, so it reads without the text: axes say what they measure and in which unit, shapes are
named (N x C x H x W, and which dims a label's numbers are), legends sit above the panels where they cover
no data, and a zero bar is written as such. CPU timings (interpreter or PyTorch's CPU code) are
watermarked in every panel and in the footer: they are not performance."""

import math
from collections import defaultdict
from pathlib import Path

from .constants import MODES
from .summary import backends, config_label, geomean, is_performance, measured, timings, varies

MODE_TITLES = {"fwd": "forward (training)", "bwd": "backward", "fwd_bwd": "forward + backward",
               "eval": "forward (eval)"}
KIND_TITLES = {"e2e": "end to end (host stalls included)", "device": "device only (no host time)"}
NOT_PERFORMANCE = "CPU timings: NOT performance"
COLORS = {"tritonbn": "tab:orange", "eager": "tab:blue", "compile": "tab:green", "flag_gems": "tab:purple",
          "apex": "tab:brown"}
DIMS = {2: "N x C", 3: "N x C x L", 4: "N x C x H x W", 5: "N x C x D x H x W"}
MARKERS = "osD^v<>"  # one per dtype x layout where a plot holds several


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
    """Device and timing method at the foot of a figure; where the timings are not GPU ones, in red, and a
    watermark in every panel."""
    devices = ", ".join(sorted({r["device"] for r in rows}))
    timing = timing or ", ".join(sorted(timings(rows)))
    performance = is_performance(rows)
    note = f"device: {devices}   timing: {timing}" + ("" if performance else f"   ({NOT_PERFORMANCE})")
    fig.text(0.01, 0.005, note, fontsize=8, color="0.3" if performance else "red", ha="left", va="bottom")
    if not performance:
        for ax in fig.axes:
            _watermark(ax)


def _watermark(ax) -> None:
    """NOT_PERFORMANCE across the middle of a panel, faint enough to read the data through, and inside the
    panel, clear of titles and labels."""
    width_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
    size = min(20.0, 0.8 * width_pt / (0.62 * len(NOT_PERFORMANCE)))  # a bold character is about 0.62 em wide
    ax.text(0.5, 0.5, NOT_PERFORMANCE, transform=ax.transAxes, ha="center", va="center", fontsize=size,
            color="red", alpha=0.25, weight="bold", zorder=5)


def header(fig, title: str, handles, labels, **legend) -> float:
    """The title, then the legend in rows below it, above the panels, where it covers no data; returns the top
    of the panels' area as a fraction of the figure (for save's ``rect``)."""
    height = fig.get_figheight()
    title_in = 0.15 + 0.22 * (title.count("\n") + 1)
    # Out of tight_layout's reckoning, which would add the title's height to the room the rect leaves it.
    fig.suptitle(title, y=1 - 0.05 / height, va="top", fontsize=11).set_in_layout(False)
    entry_in = 0.6 + 0.06 * max(len(label) for label in labels)  # a handle and 8-point text, in inches
    columns = max(1, min(len(labels), int(0.95 * fig.get_figwidth() / entry_in)))
    rows = math.ceil(len(labels) / columns)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - title_in / height), ncols=columns,
               fontsize=8, frameon=False, **legend)
    return 1 - (title_in + 0.25 * rows + 0.1) / height


def shape_axis_label(rows, vary_activation=False, vary_residual=False) -> str:
    """What the numbers of a shape label are (N x C x H x W, ...), for the ranks the rows hold."""
    ranks = sorted({len(r["shape"].split("x")) for r in rows})
    label = "shape, " + "; ".join(DIMS.get(rank, f"{rank} dims") for rank in ranks)
    if vary_activation:
        label += "; then the activation"
    return label + ("; +res: with a residual add" if vary_residual else "")


def speedup_axis(ax) -> None:
    """Log scale around 1x, with ticks a reader can name: 0.8x, 1.25x, 1.5x ... over a narrow range, 0.5x,
    0.67x, 1x, 1.5x, 2x ... over a wider one, 0.1x, 0.2x, 0.5x, 1x ... within three decades, powers of ten
    beyond."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    low, high = min(low, 0.8), max(high, 1.25)
    ax.set_ylim(low, high)
    if high / low <= 4:
        steps = (0.25, 0.33, 0.4, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 2.5, 3, 4)
    elif high / low <= 30:
        steps = (0.2, 0.25, 0.33, 0.5, 0.67, 1, 1.5, 2, 3, 4, 5)
    elif high / low <= 1000:
        steps = tuple(m * 10.0**k for k in range(-3, 2) for m in (1, 2, 5))
    else:
        steps = tuple(10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1))
    ax.yaxis.set_major_locator(FixedLocator([t for t in steps if low <= t <= high]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_locator(NullLocator())


def log_axis(axis) -> None:
    """Log ticks written plainly (500, 1000, 2000; 0.01): at 1, 2 and 5 times powers of ten where the range
    spans under three decades, else at powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = axis.get_view_interval()
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if high / low < 1000 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _offsets(count: int, width: float = 0.8) -> tuple[list[float], float]:
    """x offsets of `count` bars side by side within one group, and the bar width."""
    bar = width / count
    return [(i - (count - 1) / 2) * bar for i in range(count)], bar


def _color_handles(names):
    from matplotlib.patches import Patch

    return [Patch(color=COLORS.get(name), label=name) for name in names]


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
    width = min(16.0, max(8.0, 0.45 * len(labels_all) * max(1, len(names)) + 2))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 4.0 * len(panels) + 1.2), squeeze=False)
    offsets, bar_width = _offsets(len(names))
    for ax, (dtype, layout) in zip(axes[:, 0], panels):
        panel = [r for r in rows if (r["dtype"], r["layout"]) == (dtype, layout)]
        labels = list(dict.fromkeys(config_label(r, vary_act, vary_res) for r in panel))
        for offset, backend in zip(offsets, names):
            by_label = {config_label(r, vary_act, vary_res): r[column] for r in panel if r["backend"] == backend}
            xs = [j + offset for j, lab in enumerate(labels) if lab in by_label]
            ys = [by_label[lab] for lab in labels if lab in by_label]
            # Bars grow from 1 (eager) up or down, so a slowdown reads as a bar below the line.
            ax.bar(xs, [y - 1 for y in ys], bar_width, bottom=1, color=COLORS.get(backend))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        speedup_axis(ax)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_xlabel(shape_axis_label(panel, vary_act, vary_res))
        ax.set_ylabel("speedup over eager (log)\nhigher is better")
        ax.set_title(f"{dtype}, {layout}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = _color_handles(names) + [Line2D([], [], color="black", linestyle="--", linewidth=1)]
    top = header(fig, f"Speedup over eager PyTorch (F.batch_norm + activation): {MODE_TITLES[mode]}\n"
                      f"{KIND_TITLES[kind]}", handles, [*names, "eager (= 1x)"])
    methods = ", ".join(sorted({r["device_method"] for r in rows})) if kind == "device" else None
    figure_note(fig, rows, f"{', '.join(sorted(timings(rows)))}; device time: {methods}" if methods else None)
    return save(fig, path, rect=(0, 0.03, 1, top))


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
    width = min(16.0, max(8.0, 0.3 * len(labels) * len(names) + 2.5))
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.6 * len(modes) + 1.3), squeeze=False)
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
            ax.bar(xs, device, bar_width, color=color)
            ax.bar(xs, rest, bar_width, bottom=device, color=color, alpha=0.35, hatch="//", edgecolor=color)
            ax.scatter(xs, [r["host_us"] / 1e3 for r in chosen], marker="_", s=160, color="black", zorder=3)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        log_axis(ax.yaxis)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ms per call (log)")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[-1][0].set_xlabel(shape_axis_label(rows, vary_act, vary_res))
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = _color_handles(names) + [
        Patch(facecolor="0.4", edgecolor="0.4"),
        Patch(facecolor=(0.4, 0.4, 0.4, 0.35), edgecolor="0.4", hatch="//"),
        Line2D([], [], color="black", marker="_", linestyle="", markersize=14, markeredgewidth=2)]
    labels_ = [*names, "device time (solid part)", "rest of e2e: host stalls (hatched)", "host issue time per call"]
    top = header(fig, f"Where the time goes, {dtype} {layout}: bar height = e2e time per call (lower is better)",
                 handles, labels_, handlelength=2.6, handleheight=1.3)
    methods = ", ".join(sorted({r["device_method"] for r in rows}))
    figure_note(fig, rows, f"{', '.join(sorted(timings(rows)))}; device time: {methods}")
    return save(fig, path, rect=(0, 0.03, 1, top))


def bandwidth_kind(rows) -> str:
    """The time effective bandwidth is computed from: device time where the CSV has it (a host-bound call
    says nothing about its kernels), else e2e."""
    return "device" if any(math.isfinite(r["device_gbps"]) for r in measured(rows, "device")) else "e2e"


def _numel(row) -> int:
    return math.prod(int(n) for n in row["shape"].split("x"))


def plot_bandwidth(rows, path: Path) -> bool:
    """Effective GB/s (minimum-bytes model) per shape, smallest tensor to largest, under the copy-bandwidth
    roofline, from the time `bandwidth_kind` picks; one panel per mode."""
    kind = bandwidth_kind(rows)
    column = "device_gbps" if kind == "device" else "gbps"
    rows = [r for r in measured(rows, kind) if math.isfinite(r[column])]
    if not rows:
        return False
    plt = pyplot()
    from matplotlib.lines import Line2D

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    names = backends(rows)
    combos = sorted({(r["dtype"], r["layout"]) for r in rows})
    marker = {combo: MARKERS[i % len(MARKERS)] if len(combos) > 1 else "o" for i, combo in enumerate(combos)}
    vary_act, vary_res = varies(rows)
    by_size = sorted({(_numel(r), config_label(r, vary_act, vary_res)) for r in rows})
    position = {label: x for x, (_, label) in enumerate(dict.fromkeys(by_size))}
    columns = min(2, len(modes))
    lines = math.ceil(len(modes) / columns)
    fig, axes = plt.subplots(lines, columns, squeeze=False, sharey=True,
                             figsize=(columns * max(5.0, 0.42 * len(position) + 1.8), 4.0 * lines + 1.3))
    copy = geomean(r["copy_gbps"] for r in rows)
    offsets, _ = _offsets(len(names), width=0.5)
    for ax, mode in zip(axes.flat, modes):
        for offset, backend in zip(offsets, names):
            for combo in combos:
                pts = [r for r in rows if r["mode"] == mode and r["backend"] == backend
                       and (r["dtype"], r["layout"]) == combo]
                ax.scatter([position[config_label(r, vary_act, vary_res)] + offset for r in pts],
                           [r[column] for r in pts], s=22, alpha=0.85, marker=marker[combo],
                           color=COLORS.get(backend), zorder=3)
        ax.axhline(copy, color="red", linestyle="--", linewidth=1.2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(position)), list(position), rotation=35, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(position) - 0.4)
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(modes):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"effective bandwidth (GB/s, log)\nminimum bytes / {kind} time")
        log_axis(ax.yaxis)
    for ax in axes.flat[max(0, len(modes) - columns):len(modes)]:  # the lowest panel of each column
        ax.set_xlabel(shape_axis_label(rows, vary_act, vary_res) + "\nsmallest tensor to largest")
    handles = _color_handles(names) + [Line2D([], [], color="red", linestyle="--", linewidth=1.2)]
    labels = [*names, f"device copy: {copy:.0f} GB/s" if copy >= 100 else f"device copy: {copy:.3g} GB/s"]
    if len(combos) > 1:
        handles += [Line2D([], [], color="0.3", marker=marker[c], linestyle="") for c in combos]
        labels += [f"{dtype} {layout}" for dtype, layout in combos]
    top = header(fig, "Achieved bandwidth against the copy-bandwidth roofline (higher is better)\n"
                      f"from {KIND_TITLES[kind]}", handles, labels)
    return save(fig, path, rect=(0, 0.03, 1, top), rows=rows)


def plot_scaling(rows, path: Path) -> bool:
    """e2e time against N*H*W for the scaling preset, log-log, one line per backend (and dtype, layout)."""
    rows = [r for r in measured(rows) if r["preset"] == "scaling"]
    if not rows:
        return False
    plt = pyplot()
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 5.2), squeeze=False, sharey=True)
    handles = {}
    for ax, mode in zip(axes[0], modes):
        lines = defaultdict(list)
        for r in rows:
            if r["mode"] == mode:
                lines[(r["backend"], r["dtype"], r["layout"])].append((r["reduced"], r["e2e_ms"]))
        for (backend, dtype, layout), pts in sorted(lines.items()):
            pts.sort()
            style = "-" if dtype == "fp32" else "--"
            (line,) = ax.plot(*zip(*pts), style, marker="o", markersize=3, color=COLORS.get(backend))
            handles[f"{backend} {dtype} {layout}"] = line
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N*H*W (values per channel, log)")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(alpha=0.3, which="both")
    channels = ", ".join(sorted({str(int(r["channels"])) for r in rows}))
    axes[0][0].set_ylabel("e2e time (ms, log)")
    top = header(fig, f"Time against size, C = {channels} (lower is better)", list(handles.values()), list(handles))
    return save(fig, path, rect=(0, 0.03, 1, top), rows=rows)


def _byte_unit(values) -> tuple[float, str]:
    largest = max(values, default=0.0)
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "bytes"


def _bytes_text(value: float) -> str:
    scale, unit = _byte_unit([value])
    return "0" if value == 0 else f"{value / scale:.3g} {'B' if unit == 'bytes' else unit}"


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
                             figsize=(min(16.0, max(8.0, 0.45 * len(labels) * len(names) + 2)),
                                      4.0 * len(metrics) + 1.2))
    offsets, bar_width = _offsets(len(names))
    for ax, (column, mode, title) in zip(axes[:, 0], metrics):
        # Over activations and residual settings, the largest value: memory plans for the worst case.
        worst = defaultdict(float)
        for r in rows:
            if r["mode"] == mode and math.isfinite(r[column]):
                worst[r["backend"], r["shape"]] = max(worst[r["backend"], r["shape"]], r[column])
        scale, unit = _byte_unit(worst.values())
        largest = max(worst.values(), default=0.0)
        for offset, backend in zip(offsets, names):
            picked = [(j + offset, worst[backend, s]) for j, s in enumerate(labels) if (backend, s) in worst]
            ax.bar([x for x, _ in picked], [v / scale for _, v in picked], bar_width, color=COLORS.get(backend))
            for x, value in picked:
                if value < 0.02 * largest:  # a bar too low to see reads as a missing one: write what it holds
                    ax.text(x, 0, f" {_bytes_text(value)}", ha="center", va="bottom", rotation=90, fontsize=7,
                            color=COLORS.get(backend), weight="bold")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"{unit} (lower is better)")
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.08)
        ax.grid(axis="y", alpha=0.3)
    axes[-1][0].set_xlabel(shape_axis_label(rows))
    note = "" if len(metrics) > 1 else "; peak allocation is measured on CUDA only"
    top = header(fig, f"Memory per backend and shape ({combo[0]}, {combo[1]}{note})\n"
                      "bars too low to see are written with their size (0: nothing extra)",
                 _color_handles(names), names)
    return save(fig, path, rect=(0, 0, 1, top))


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
        ax.set_xlabel("variant")
        ax.set_xlim(-0.6, len(variants) - 0.4)  # room for a skipped variant's label at either end
        ax.set_title(f"{precision}, batch {batch}", fontsize=10)
        ax.set_ylabel("ms per training step")
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color="0.75"), Patch(color=COLORS["eager"]), Patch(color=COLORS["tritonbn"])]
    top = header(fig, f"Training step of {ok[0]['model']} (lower is better)\nabove each bar: BN+act's share of the "
                      "step, speedup over eager", handles,
                 ["network without BN+act (identity)", "BN+act, PyTorch", "BN+act, tritonbn.fuse"])
    figure_note(fig, rows)
    return save(fig, path, rect=(0, 0.03, 1, top))
