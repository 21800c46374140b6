"""Plots and report.md from a sweep's CSV.

Each plot names its device, timing method and what its bars or points mean, so it reads without the text.
CSVs taken on a CPU (interpreter or reference timings) are reported with a warning on every plot and at
the top of report.md: such numbers show that the harness works, not how fast anything is.
"""

import math
from collections import defaultdict
from pathlib import Path

from .results import read_rows
from .timing import CUDA_EVENTS

MODES = ("fwd", "bwd", "fwd_bwd", "eval")
MODE_TITLES = {"fwd": "forward (training)", "bwd": "backward", "fwd_bwd": "forward + backward",
               "eval": "forward (eval)"}
NOT_PERFORMANCE = "CPU / interpreter timings: NOT performance"
COLORS = {"tritonbn": "tab:orange", "eager": "tab:blue", "compile": "tab:green", "flag_gems": "tab:purple",
          "apex": "tab:brown"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def geomean(values) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def _measured(rows):
    return [r for r in rows if r["ok"] and math.isfinite(r["median_ms"])]


def _timings(rows) -> set:
    return {r["timing"] for r in rows}


def _is_performance(rows) -> bool:
    return _timings(rows) == {CUDA_EVENTS}


def _config_label(row, vary_activation: bool, vary_residual: bool) -> str:
    label = row["shape"]
    if vary_activation:
        label += f" {row['activation']}"
    if vary_residual and row["residual"]:
        label += " +res"
    return label


def _save(fig, path: Path, rect=(0, 0, 1, 1), rows=None) -> bool:
    """Lay out, write and close a figure (with the device/timing note when ``rows`` are given)."""
    if rows is not None:
        _figure_note(fig, rows)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return True


def _figure_note(fig, rows) -> None:
    """Device and timing method at the foot of a figure; a red warning when the timings are not GPU ones."""
    devices = ", ".join(sorted({r["device"] for r in rows}))
    fig.text(0.01, 0.005, f"device: {devices}   timing: {', '.join(sorted(_timings(rows)))}", fontsize=8,
             color="0.3", ha="left", va="bottom")
    if not _is_performance(rows):
        size = min(22.0, 2.0 * fig.get_figwidth())  # the watermark must fit the figure's width
        fig.text(0.5, 0.5, NOT_PERFORMANCE, fontsize=size, color="red", alpha=0.3, ha="center", va="center",
                 rotation=15, weight="bold")


def _backends(rows) -> list[str]:
    order = list(COLORS)
    return sorted({r["backend"] for r in rows}, key=lambda b: (order.index(b) if b in order else 99, b))


def _speedup_axis(ax) -> None:
    """Log scale with ticks at powers of two, written as 0.5x, 1x, 2x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(LogLocator(base=2))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.5), max(high, 2.0))


def plot_speedup(rows, mode: str, path: Path) -> bool:
    """Bars: each backend's speedup over eager per shape, one panel per dtype x layout."""
    rows = [r for r in _measured(rows) if r["mode"] == mode and r["backend"] != "eager"
            and math.isfinite(r["speedup_vs_eager"])]
    if not rows:
        return False
    plt = _pyplot()
    panels = sorted({(r["dtype"], r["layout"]) for r in rows})
    backends = _backends(rows)
    vary_act = len({r["activation"] for r in rows}) > 1
    vary_res = len({r["residual"] for r in rows}) > 1
    labels_all = {_config_label(r, vary_act, vary_res) for r in rows}
    width = max(8.0, 0.45 * len(labels_all) * max(1, len(backends)) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.6 * len(panels) + 0.8), squeeze=False)
    for ax, (dtype, layout) in zip(axes[:, 0], panels):
        panel = [r for r in rows if (r["dtype"], r["layout"]) == (dtype, layout)]
        labels = list(dict.fromkeys(_config_label(r, vary_act, vary_res) for r in panel))
        bar_width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            by_label = {_config_label(r, vary_act, vary_res): r["speedup_vs_eager"] for r in panel
                        if r["backend"] == backend}
            xs = [j + (i - (len(backends) - 1) / 2) * bar_width for j, lab in enumerate(labels) if lab in by_label]
            ys = [by_label[lab] for lab in labels if lab in by_label]
            # Bars grow from 1 (eager) up or down, so a slowdown reads as a bar below the line.
            ax.bar(xs, [y - 1 for y in ys], bar_width, bottom=1, label=backend, color=COLORS.get(backend))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="eager (= 1)")
        _speedup_axis(ax)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("speedup over eager\n(higher is better)")
        ax.set_title(f"{dtype}, {layout}", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="y", alpha=0.3, which="both")
    fig.suptitle(f"Speedup over eager PyTorch (F.batch_norm + activation): {MODE_TITLES[mode]}")
    return _save(fig, path, rect=(0, 0.03, 1, 1), rows=rows)


def plot_bandwidth(rows, path: Path) -> bool:
    """Effective GB/s (minimum-bytes model) against the tensor size, under the copy-bandwidth roofline."""
    rows = [r for r in _measured(rows) if math.isfinite(r["gbps"])]
    if not rows:
        return False
    plt = _pyplot()
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.4), squeeze=False, sharey=True)
    copy = geomean(r["copy_gbps"] for r in rows)
    for ax, mode in zip(axes[0], modes):
        for backend in _backends(rows):
            pts = [r for r in rows if r["mode"] == mode and r["backend"] == backend]
            ax.scatter([r["min_bytes"] / 2**20 for r in pts], [r["gbps"] for r in pts], s=14, alpha=0.75,
                       label=backend, color=COLORS.get(backend))
        ax.axhline(copy, color="red", linestyle="--", linewidth=1.2, label=f"device copy: {copy:.3g} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("minimum bytes moved (MiB)")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("effective bandwidth (GB/s)\nminimum bytes / median time")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper right", ncols=len(labels))
    fig.suptitle("Achieved bandwidth against the copy-bandwidth roofline (higher is better)", x=0.02,
                 ha="left")
    return _save(fig, path, rect=(0, 0.04, 1, 0.95), rows=rows)


def plot_scaling(rows, path: Path) -> bool:
    """Median time against N*H*W for the scaling preset, log-log, one line per backend (and dtype, layout)."""
    rows = [r for r in _measured(rows) if r["preset"] == "scaling"]
    if not rows:
        return False
    plt = _pyplot()
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.4), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        lines = defaultdict(list)
        for r in rows:
            if r["mode"] == mode:
                lines[(r["backend"], r["dtype"], r["layout"])].append((r["reduced"], r["median_ms"]))
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
    axes[0][0].set_ylabel("median time (ms)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Time against size, C = {channels} (lower is better)")
    return _save(fig, path, rect=(0, 0.04, 1, 1), rows=rows)


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
    plt = _pyplot()
    rows = [r for r in rows if (r["dtype"], r["layout"]) == combo]
    backends = _backends(rows)
    peak_mode = "fwd_bwd" if any(r["mode"] == "fwd_bwd" for r in rows) else "fwd"
    metrics = [("saved_extra_bytes", "fwd", "saved for backward, beyond tensors the network holds anyway")]
    if any(r["mode"] == peak_mode and math.isfinite(r["peak_mem_bytes"]) for r in rows):
        metrics.append(("peak_mem_bytes", peak_mode, f"peak extra allocation during {peak_mode}"))
    labels = list(dict.fromkeys(r["shape"] for r in rows if r["mode"] == "fwd"))
    fig, axes = plt.subplots(len(metrics), 1, squeeze=False,
                             figsize=(max(8.0, 0.5 * len(labels) * len(backends) + 2), 3.8 * len(metrics) + 0.8))
    bar_width = 0.8 / len(backends)
    for ax, (column, mode, title) in zip(axes[:, 0], metrics):
        # Over activations and residual settings, the largest value: memory plans for the worst case.
        worst = defaultdict(float)
        for r in rows:
            if r["mode"] == mode and math.isfinite(r[column]):
                worst[r["backend"], r["shape"]] = max(worst[r["backend"], r["shape"]], r[column])
        scale, unit = _byte_unit(worst.values())
        for i, backend in enumerate(backends):
            picked = [(j, worst[backend, s]) for j, s in enumerate(labels) if (backend, s) in worst]
            ax.bar([j + (i - (len(backends) - 1) / 2) * bar_width for j, _ in picked],
                   [v / scale for _, v in picked], bar_width, label=backend, color=COLORS.get(backend))
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"{unit} (lower is better)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    note = "" if len(metrics) > 1 else "; peak allocation is measured on CUDA only"
    fig.suptitle(f"Memory per backend and shape ({combo[0]}, {combo[1]}{note})")
    return _save(fig, path)


def _fmt(value, spec=".3g") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(
        value, spec)


def _table(header, body) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]


def _summary_lines(rows) -> list[str]:
    lines = ["## Geomean speedup per mode", "",
             "Geometric mean over configurations (shape, dtype, layout, activation, residual) measured on "
             "both backends; above 1 means faster than the baseline.", ""]
    body = []
    for mode in MODES:
        for backend in _backends(rows):
            picked = [r for r in _measured(rows) if r["mode"] == mode and r["backend"] == backend]
            if picked and backend != "eager":
                body.append([mode, backend, _fmt(geomean(r["speedup_vs_eager"] for r in picked)),
                             _fmt(geomean(r["speedup_vs_compile"] for r in picked)), len(picked)])
    return lines + (_table(["mode", "backend", "vs eager", "vs compile", "configs"], body) if body
                    else ["No backend besides eager was measured."])


def _slowest_lines(rows, count=10) -> list[str]:
    picked = sorted((r for r in _measured(rows) if r["backend"] == "tritonbn"
                     and math.isfinite(r["speedup_vs_eager"])), key=lambda r: r["speedup_vs_eager"])[:count]
    lines = ["## Slowest shapes", "", "tritonbn's configurations with the lowest speedup over eager.", ""]
    if not picked:
        return lines + ["No tritonbn row with an eager counterpart."]
    body = [[r["shape"], r["dtype"], r["layout"], r["activation"], "yes" if r["residual"] else "no", r["mode"],
             _fmt(r["median_ms"], ".4g"), _fmt(r["median_ms"] * r["speedup_vs_eager"], ".4g"),
             _fmt(r["speedup_vs_eager"]), _fmt(r["pct_copy_bw"], ".3g")] for r in picked]
    return lines + _table(["shape", "dtype", "layout", "act", "residual", "mode", "tritonbn ms", "eager ms",
                           "speedup", "% copy bw"], body)


def _problem_lines(rows) -> list[str]:
    """Every row that holds no valid measurement, grouped by backend and reason."""
    reasons = defaultdict(int)
    for r in rows:
        if not r["ok"]:
            reasons[(r["backend"], r["status"])] += 1
    if not reasons:
        return ["## Rows not measured", "", "None: every backend matched eager on every configuration."]
    body = [[b, s, n] for (b, s), n in sorted(reasons.items())]
    return ["## Rows not measured", "", "Skipped, failed, or not matching eager (`ok` false in the CSV).", ""
            ] + _table(["backend", "status", "rows"], body)


def _header_lines(rows, csv_path) -> list[str]:
    first = rows[0]
    timings = ", ".join(sorted(_timings(rows)))
    lines = ["# tritonbn performance report", ""]
    if not _is_performance(rows):
        lines += ["> **Warning: these timings are not performance.** They were taken on a CPU "
                  f"(`timing = {timings}`): the Triton kernels ran under the interpreter or the PyTorch "
                  "reference path. They show that the harness and the kernels work; only a GPU run "
                  "(`timing = cuda-events`) measures speed.", ""]
    commits = ", ".join(sorted({r["git_commit"] for r in rows}))
    stamps = sorted(r["timestamp"] for r in rows)
    copy = geomean(r["copy_gbps"] for r in rows)
    return lines + [
        f"- Source: `{Path(csv_path).name}` ({len(rows)} rows)",
        f"- Device: {', '.join(sorted({r['device'] for r in rows}))}",
        f"- Versions: torch {first['torch']}, triton {first['triton']}, cuDNN {first['cudnn']}",
        f"- Git commit: {commits}",
        f"- Measured: {stamps[0]} to {stamps[-1]}",
        f"- Timing: {timings}; device copy bandwidth measured in the same run: {_fmt(copy)} GB/s",
        "- Effective bandwidth uses the minimum-bytes model of `tritonbn.perf.bandwidth` (fwd: read x, write "
        "y; bwd: read dy and x, write dx; a residual adds its reads and writes).",
        "",
    ]


def make_report(csv_path, out_dir) -> Path:
    """Write the plots and report.md for `csv_path` into `out_dir`; return the path of report.md."""
    rows = read_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} holds no rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for mode in MODES:
        if plot_speedup(rows, mode, out / f"speedup_{mode}.png"):
            plots.append((f"Speedup over eager, {MODE_TITLES[mode]}", f"speedup_{mode}.png"))
    for title, name, plot in (("Bandwidth against the copy roofline", "bandwidth.png", plot_bandwidth),
                              ("Time against N*H*W (scaling preset)", "scaling.png", plot_scaling),
                              ("Memory per backend", "memory.png", plot_memory)):
        if plot(rows, out / name):
            plots.append((title, name))
    lines = _header_lines(rows, csv_path) + _summary_lines(rows) + [""] + _slowest_lines(rows) + [""]
    lines += _problem_lines(rows) + ["", "## Plots", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in plots] or ["No plot: nothing measured."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
