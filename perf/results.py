"""The sweep's CSV: one tidy row per (shape, dtype, layout, activation, residual, mode, backend).

Writing merges with what the file already holds: a re-run configuration replaces its row, others stay.
Speedups are derived columns, recomputed over the merged table so they always pair rows of the same
configuration, whichever run produced them.
"""

import csv
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

KEY = ("shape", "dtype", "layout", "activation", "residual", "mode", "backend")

COLUMNS = (
    "preset", "shape", "ndim", "channels", "reduced", "layers", "dtype", "layout", "activation", "residual",
    "mode", "backend", "status", "ok", "max_err", "timing", "median_ms", "p20_ms", "p80_ms", "min_bytes",
    "gbps", "copy_gbps", "pct_copy_bw", "peak_mem_bytes", "saved_bytes", "saved_extra_bytes",
    "speedup_vs_eager", "speedup_vs_compile", "device", "torch", "triton", "cudnn", "git_commit", "timestamp",
)
NUMERIC = (
    "ndim", "channels", "reduced", "layers", "max_err", "median_ms", "p20_ms", "p80_ms", "min_bytes", "gbps",
    "copy_gbps", "pct_copy_bw", "peak_mem_bytes", "saved_bytes", "saved_extra_bytes", "speedup_vs_eager",
    "speedup_vs_compile",
)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment(device: torch.device) -> dict:
    """The columns that say where and with what a row was measured."""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": str(cudnn) if cudnn else "none",
        "git_commit": git_commit(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def row_key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in KEY)


def read_rows(path) -> list[dict]:
    """Rows of a results CSV with the numeric columns as floats (NaN where empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for col in NUMERIC:
            value = row.get(col, "")
            row[col] = float(value) if value not in ("", None) else math.nan
        row["ok"] = row.get("ok") == "True"
        row["residual"] = row.get("residual") == "True"
    return rows


def _add_speedups(rows: list[dict]) -> None:
    by_config = {row_key(row): row for row in rows}
    for row in rows:
        config = row_key(row)[:-1]
        for base in ("eager", "compile"):
            ref = by_config.get(config + (base,))
            ok = ref is not None and ref["ok"] and row["ok"]
            row[f"speedup_vs_{base}"] = ref["median_ms"] / row["median_ms"] if ok else math.nan


def write_rows(path, new_rows: list[dict]) -> list[dict]:
    """Merge `new_rows` into the CSV at `path` (created if missing) and return the merged table."""
    merged = {row_key(r): r for r in (read_rows(path) if os.path.exists(path) else [])}
    for row in new_rows:
        merged[row_key(row)] = row
    rows = list(merged.values())
    _add_speedups(rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(row.get(k)) for k in COLUMNS})
    return rows


def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return "" if value is None else str(value)


def write_table(rows: list[dict], path) -> None:
    """A plain CSV of `rows` (all with the same keys), for the traffic and step tables."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
