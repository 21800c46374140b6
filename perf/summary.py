"""Numbers drawn from a sweep's rows, shared by the report, its plots and the README block."""

import math
from collections import defaultdict

from .breakdown import REFERENCE
from .constants import BACKENDS, BASELINES, MODES, TIME_KINDS
from .timing import CUDA_EVENTS


def geomean(values) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def measured(rows, kind: str = "e2e") -> list[dict]:
    """Rows that passed the checks and hold a time of `kind`."""
    return [r for r in rows if r["ok"] and math.isfinite(r[f"{kind}_ms"])]


def timings(rows) -> set:
    return {r["timing"] for r in rows}


def is_performance(rows) -> bool:
    return timings(rows) == {CUDA_EVENTS}


def has_split(rows) -> bool:
    """Whether any row holds a device/host split (CSVs from before the split do not)."""
    return any(math.isfinite(r["device_ms"]) and math.isfinite(r["host_us"]) for r in measured(rows))


def backends(rows) -> list[str]:
    return sorted({r["backend"] for r in rows},
                  key=lambda b: (BACKENDS.index(b) if b in BACKENDS else 99, b))


def bound(row) -> str | None:
    """"host" when issuing a call takes the host longer than the device takes to run it, else "device";
    None where there is no split (a CPU running everything synchronously, or no split measured)."""
    if row["device_method"] in ("", REFERENCE) or not math.isfinite(row["device_ms"] * row["host_us"]):
        return None
    return "host" if row["host_us"] / 1e3 > row["device_ms"] else "device"


def speedup(row, kind: str, base: str) -> float:
    return row[f"{kind}_speedup_vs_{base}"]


def geomean_speedups(rows) -> list[dict]:
    """Per mode and non-eager backend: geomean speedups over eager and compile, e2e and device."""
    out = []
    for mode in MODES:
        for backend in backends(rows):
            picked = [r for r in measured(rows) if r["mode"] == mode and r["backend"] == backend]
            if picked and backend != "eager":
                out.append({"mode": mode, "backend": backend, "configs": len(picked), **{
                    f"{kind}_vs_{base}": geomean(speedup(r, kind, base) for r in picked)
                    for kind in TIME_KINDS for base in BASELINES}})
    return out


def config_label(row, vary_activation: bool, vary_residual: bool) -> str:
    label = row["shape"]
    if vary_activation:
        label += f" {row['activation']}"
    if vary_residual and row["residual"]:
        label += " +res"
    return label


def varies(rows) -> tuple[bool, bool]:
    """Whether the activation, and the residual setting, differ between rows (then labels name them)."""
    return len({r["activation"] for r in rows}) > 1, len({r["residual"] for r in rows}) > 1


def bound_per_shape(rows, backend: str = "tritonbn") -> list[dict]:
    """Per (shape, dtype, layout, activation, residual): which modes are host- or device-bound for
    `backend`, and its geomean speedups over the modes, e2e and device."""
    groups = defaultdict(list)
    for r in measured(rows):
        if r["backend"] == backend:
            groups[(r["dtype"], r["layout"], r["shape"], r["activation"], r["residual"])].append(r)
    vary_act, vary_res = varies(rows)
    out = []
    for (dtype, layout, _, _, _), picked in groups.items():
        kinds = defaultdict(list)
        for r in sorted(picked, key=lambda r: MODES.index(r["mode"])):
            kinds[bound(r)].append(r["mode"])
        out.append({"label": config_label(picked[0], vary_act, vary_res), "dtype": dtype, "layout": layout,
                    "bound": {k: v for k, v in kinds.items() if k is not None},
                    **{f"{kind}_vs_{base}": geomean(speedup(r, kind, base) for r in picked)
                       for kind in TIME_KINDS for base in BASELINES}})
    return sorted(out, key=lambda g: (g["dtype"], g["layout"]))
