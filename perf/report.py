"""report.md and its plots from a sweep's CSV.

CSVs taken on a CPU (interpreter or reference timings) are reported with a warning at the top of
report.md and on every plot: such numbers show that the harness works, not how fast anything is. CSVs
from before the harness split e2e time into device and host time get the e2e parts only. report.md says
which of its numbers and plots are end to end and which device-only, and takes the package's commit
from a provenance.json beside the CSV where the CSV has none.
"""

import math
from collections import Counter
from pathlib import Path

from . import plots, provenance
from .bandwidth import floor_passes
from .constants import BASELINES, MODES, TIME_KINDS
from .results import read_rows
from .summary import (
    backends,
    bound_per_shape,
    geomean,
    geomean_speedups,
    has_split,
    is_performance,
    measured,
)
from .timing import MEANINGS


def fmt(value, spec=".3g") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(
        value, spec)


def table(header, body) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]


def speedup_columns(rows) -> list[tuple[str, str]]:
    """(kind, baseline) of the speedups to show: device ones only where the rows hold a device/host split."""
    kinds = TIME_KINDS if has_split(rows) else ("e2e",)
    return [(kind, base) for kind in kinds for base in BASELINES]


def _headings(columns) -> list[str]:
    return [f"{kind} vs {base}" for kind, base in columns]


def _summary_lines(rows) -> list[str]:
    lines = ["## Geomean speedup per mode", "",
             "Geometric mean over configurations (shape, dtype, layout, activation, residual) measured on "
             "both backends; above 1 means faster than the baseline. *e2e*: each call timed with its host "
             "stalls" + ("; *device*: the device's time alone (`device_method`)." if has_split(rows) else "."), ""]
    columns = speedup_columns(rows)
    body = [[g["mode"], g["backend"], *(fmt(g[f"{kind}_vs_{base}"]) for kind, base in columns), g["configs"]]
            for g in geomean_speedups(rows)]
    return lines + (table(["mode", "backend", *_headings(columns), "configs"], body) if body
                    else ["No backend besides eager was measured."])


def _bound_text(bounds: dict) -> str:
    if not bounds:
        return "n/a"
    if len(bounds) == 1:
        return next(iter(bounds))
    return "; ".join(f"{kind}: {', '.join(modes)}" for kind, modes in bounds.items())


def _bound_lines(rows) -> list[str]:
    lines = ["## Host- or device-bound, per shape", ""]
    if not has_split(rows):
        return lines + ["This CSV holds no device/host split (it predates those columns), so no shape can "
                        "be called host- or device-bound."]
    groups = bound_per_shape(rows)
    lines += ["For tritonbn: *host* where issuing a call takes the host longer (`host_us`) than the device "
              "takes to run it (`device_ms`), per mode; speedups are geomeans over the modes. Rows whose "
              "device time is not separable from host time (`reference`, a CPU) read n/a.", ""]
    if not groups:
        return lines + ["No tritonbn row."]
    columns = speedup_columns(rows)
    body = [[g["label"], g["dtype"], g["layout"], _bound_text(g["bound"]),
             *(fmt(g[f"{kind}_vs_{base}"]) for kind, base in columns)] for g in groups]
    tritonbn = [r for r in measured(rows) if r["backend"] == "tritonbn"]
    counts = Counter(kind for g in groups for kind, modes in g["bound"].items() for _ in modes)
    tally = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
    body.append(["**all**", "", "", f"{tally} (shape x mode)" if tally else "n/a",
                 *(fmt(geomean(r[f"{kind}_speedup_vs_{base}"] for r in tritonbn)) for kind, base in columns)])
    return lines + table(["shape", "dtype", "layout", "bound", *_headings(columns)], body)


def _slowest_lines(rows, count=10) -> list[str]:
    picked = sorted((r for r in measured(rows) if r["backend"] == "tritonbn"
                     and math.isfinite(r["e2e_speedup_vs_eager"])), key=lambda r: r["e2e_speedup_vs_eager"])[:count]
    lines = ["## Slowest shapes", "", "tritonbn's configurations with the lowest end-to-end speedup over eager.", ""]
    if not picked:
        return lines + ["No tritonbn row with an eager counterpart."]
    split = has_split(rows)
    body = [[r["shape"], r["dtype"], r["layout"], r["activation"], "yes" if r["residual"] else "no", r["mode"],
             fmt(r["e2e_ms"], ".4g"), fmt(r["e2e_ms"] * r["e2e_speedup_vs_eager"], ".4g"),
             fmt(r["e2e_speedup_vs_eager"]), *([fmt(r["device_speedup_vs_eager"])] if split else []),
             fmt(r["pct_copy_bw"], ".3g")] for r in picked]
    return lines + table(["shape", "dtype", "layout", "act", "residual", "mode", "tritonbn e2e ms", "eager e2e ms",
                          "e2e speedup", *(["device speedup"] if split else []), "% copy bw (e2e)"], body)


def _host_split_lines(rows) -> list[str]:
    """The host's issue time of a training call split into forward and backward, per backend (fwd_bwd rows)."""
    picked = [r for r in measured(rows) if r["mode"] == "fwd_bwd" and math.isfinite(r["host_fwd_us"])]
    lines = ["## Host time per training call: forward and backward", ""]
    if not picked:
        return lines + ["No fwd_bwd row with the split (CSVs from before those columns have none)."]
    lines += ["The host's time to issue one call's forward, and then its backward, without waiting for the device "
              "(`host_fwd_us`, `host_bwd_us`; on a CPU with the interpreted launches skipped), in microseconds.", ""]
    backends = [b for b in ("tritonbn", "eager", "compile") if any(r["backend"] == b for r in picked)]
    groups = {}
    for r in picked:
        groups.setdefault((r["shape"], r["dtype"], r["layout"], r["activation"], r["residual"]), {})[r["backend"]] = r
    body = [[shape, dtype, layout, *(f"{fmt(by[b]['host_fwd_us'], '.1f')} + {fmt(by[b]['host_bwd_us'], '.1f')}"
                                     if b in by else "" for b in backends)]
            for (shape, dtype, layout, _, _), by in groups.items()]
    return lines + table(["shape", "dtype", "layout", *(f"{b} fwd + bwd us" for b in backends)], body)


FLOOR_TARGET = 85.0  # % of copy bandwidth over the floor's bytes that the kernels aim at (device time)
FLOOR_MIN_BYTES = 32 * 2**20  # the target applies to tensors past the L2 cache


def _floor_lines(rows) -> list[str]:
    """Device time against the memory floor (bandwidth.floor_passes at the copy bandwidth), per backend."""
    picked = [r for r in measured(rows) if r["mode"] in ("fwd_bwd", "eval") and math.isfinite(r["device_pct_floor"])]
    lines = ["## Against the memory floor (device time)", ""]
    if not picked:
        return lines + ["No row with device time and a floor (CSVs from before the floor columns have none)."]
    lines += [f"Device time of the floor's bytes at the copy bandwidth measured in the same run, over the measured "
              f"device time, in %: 100 is the floor at copy speed. The floor is 8 passes over the tensor for fwd_bwd "
              f"and 2 for eval (`tritonbn.perf.bandwidth.floor_passes`); the target, {FLOOR_TARGET:g} %, applies to "
              f"activation tensors of {FLOOR_MIN_BYTES // 2**20} MB or more (marked *).", ""]
    backends = [b for b in ("tritonbn", "eager", "compile") if any(r["backend"] == b for r in picked)]
    groups = {}
    for r in picked:
        key = (r["shape"], r["dtype"], r["layout"], r["activation"], r["residual"], r["mode"])
        groups.setdefault(key, {})[r["backend"]] = r
    body = []
    for (shape, dtype, layout, activation, residual, mode), by_backend in groups.items():
        some = next(iter(by_backend.values()))
        tensor_bytes = some["floor_bytes"] / floor_passes(mode, residual, activation)
        big = tensor_bytes >= FLOOR_MIN_BYTES
        body.append([shape + (" *" if big else ""), dtype, layout, mode,
                     *(fmt(by_backend[b]["device_pct_floor"], ".3g") if b in by_backend else "" for b in backends)])
    return lines + table(["shape", "dtype", "layout", "mode", *(f"{b} %" for b in backends)], body)


def _problem_lines(rows) -> list[str]:
    """Every row that holds no valid measurement, grouped by backend and reason."""
    reasons = Counter((r["backend"], r["status"]) for r in rows if not r["ok"])
    if not reasons:
        return ["## Rows not measured", "", "None: every backend passed the checks on every configuration."]
    body = [[b, s, n] for (b, s), n in sorted(reasons.items())]
    return ["## Rows not measured", "", "Skipped, failed, or not passing the correctness checks (`ok` false "
            "in the CSV).", ""] + table(["backend", "status", "rows"], body)


def _timing_text(rows) -> str:
    """Each timing label of the rows that hold a time, what it means, and the backends timed so."""
    rows_of = {}
    for r in rows:
        if math.isfinite(r["e2e_ms"]):
            rows_of.setdefault(r["timing"], []).append(r)
    return "; ".join(f"`{label}` ({MEANINGS.get(label, 'unknown label')}): {', '.join(backends(labelled))}"
                     for label, labelled in sorted(rows_of.items())) or "no row holds a time"


def _measured_text(rows) -> str:
    stamps = sorted(r["timestamp"] for r in rows)
    if stamps[0] == stamps[-1]:
        return stamps[0] + (" (every row records this one time; sweeps before per-row times recorded when they "
                             "started)" if len(rows) > 1 else "")
    return f"{stamps[0]} to {stamps[-1]} (the first and the last row's)"


def _header_lines(rows, csv_path) -> list[str]:
    first = rows[0]
    lines = ["# tritonbn performance report", ""]
    if not is_performance(rows):
        lines += ["> **Warning: these timings are not performance.** They were taken on a CPU: the wall time of "
                  "Triton's interpreter, which runs a kernel's programs one after another in Python, or of "
                  "PyTorch's CPU code. They show that the harness and the kernels work; only a GPU run "
                  "(`timing = cuda-events`) measures speed.", ""]
    methods = Counter(r["device_method"] for r in rows if r["device_method"])
    device_time = ", ".join(f"{m} ({n} rows)" for m, n in methods.most_common()) or "not measured in this CSV"
    return lines + [
        f"- Source: `{Path(csv_path).name}` ({len(rows)} rows)",
        f"- Device: {', '.join(sorted({r['device'] for r in rows}))}",
        f"- Versions: torch {first['torch']}, triton {first['triton']}, cuDNN {first['cudnn']}",
        f"- Git commit: {provenance.commit(rows, provenance.read(Path(csv_path).parent))}",
        f"- Measured: {_measured_text(rows)}",
        f"- Timing (e2e), per label: {_timing_text(rows)}",
        f"- Device copy bandwidth measured in the same run: {fmt(geomean(r['copy_gbps'] for r in rows), '.4g')} GB/s",
        f"- Device time: {device_time}",
        "- Effective bandwidth uses the minimum-bytes model of `tritonbn.perf.bandwidth` (fwd: read x, write "
        "y; bwd: read dy and x, write dx; a residual adds its reads and writes).",
        "",
    ]


def _kinds_lines(rows, made: list[tuple[str, str]]) -> list[str]:
    """Which numbers and plots of the report are end to end, and which device-only."""
    names = [name for _, name in made]

    def plots_of(prefixes) -> str:
        found = [f"`{name}`" for name in names if name.startswith(prefixes)]
        return f"; plots {', '.join(found)}" if found else ""

    lines = ["## End to end or device-only", ""]
    bandwidth = ("bandwidth",) if plots.bandwidth_kind(rows) == "device" else ()
    if not has_split(rows):
        return lines + ["Every timing here is **end to end** (`e2e_ms`: each call timed with its host stalls): "
                        "this CSV holds no device-only time. Columns *e2e*, *% copy bw (e2e)*"
                        + plots_of(("speedup_", "bandwidth", "scaling")) + "."]
    methods = ", ".join(sorted({r["device_method"] for r in rows if r["device_method"]}))
    lines += [
        "- **End to end** (`e2e_ms`: each call timed with its host stalls; on a GPU, CUDA events around the "
        "call): the *e2e* speedup columns, and *tritonbn e2e ms*, *eager e2e ms* and *% copy bw (e2e)* of the "
        "slowest shapes" + plots_of(("speedup_", "scaling", *({"bandwidth"} - set(bandwidth)))) + ".",
        f"- **Device-only** (`device_ms`: the device's time alone, by {methods}): the *device* speedup columns"
        + plots_of(("device_speedup_", *bandwidth)) + ".",
        "- **Host** (`host_us`: the time the host takes to issue one call): the *bound* column (host where it "
        "exceeds the device time).",
    ]
    overhead = [f"`{name}`" for name in names if name.startswith("overhead_")]
    if overhead:
        lines += ["", f"The host-and-device plots ({', '.join(overhead)}) show all three: a bar's height is the "
                      "e2e time, its solid part the device time, and a mark the host's issue time."]
    return lines


def _plots(rows, out: Path) -> list[tuple[str, str]]:
    """Write every plot the rows allow; (title, file name) of each."""
    made = []
    for kind in TIME_KINDS:
        for mode in MODES:
            name = f"speedup_{mode}.png" if kind == "e2e" else f"device_speedup_{mode}.png"
            if plots.plot_speedup(rows, mode, out / name, kind):
                made.append((f"Speedup over eager, {kind}, {plots.MODE_TITLES[mode]}", name))
    for dtype, layout in sorted({(r["dtype"], r["layout"]) for r in rows}):
        name = f"overhead_{dtype}_{layout}.png"
        if plots.plot_overhead(rows, dtype, layout, out / name):
            made.append((f"Host and device time, {dtype} {layout}", name))
    for title, name, plot in (("Bandwidth against the copy roofline", "bandwidth.png", plots.plot_bandwidth),
                              ("Time against N*H*W (scaling preset)", "scaling.png", plots.plot_scaling),
                              ("Memory per backend", "memory.png", plots.plot_memory)):
        if plot(rows, out / name):
            made.append((title, name))
    return made


def make_report(csv_path, out_dir) -> Path:
    """Write the plots and report.md for `csv_path` into `out_dir`; return the path of report.md."""
    rows = read_rows(csv_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = _plots(rows, out)
    lines = _header_lines(rows, csv_path) + _kinds_lines(rows, made) + [""] + _summary_lines(rows) + [""]
    lines += _bound_lines(rows) + [""] + _host_split_lines(rows) + [""]
    lines += _slowest_lines(rows) + [""] + _floor_lines(rows) + [""] + _problem_lines(rows) + ["", "## Plots", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in made] or ["No plot: nothing measured."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
