"""The sweep's CSV: one tidy row per (shape, dtype, layout, activation, residual, mode, backend).

Writing merges with what the file already holds: a re-run configuration replaces its row, others stay.
Speedups are derived columns, recomputed over the merged table so they always pair rows of the same
configuration, whichever run produced them. CSVs written before a column existed stay readable: renamed
columns are read under their new names and missing ones read as empty (NaN).
"""

import csv
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from .constants import BASELINES, TIME_KINDS

KEY = ("shape", "dtype", "layout", "activation", "residual", "mode", "backend")

COLUMNS = (
    "preset", "shape", "ndim", "channels", "reduced", "layers", "dtype", "layout", "activation", "residual",
    "mode", "backend", "status", "ok", "err_rel_l2", "err_outliers", "timing", "e2e_ms", "e2e_p20_ms",
    "e2e_p80_ms", "device_method", "device_ms", "host_us", "host_fwd_us", "host_bwd_us", "launches",
    "min_bytes", "gbps", "device_gbps", "copy_gbps", "pct_copy_bw", "device_pct_copy_bw", "floor_bytes",
    "device_pct_floor", "peak_mem_bytes", "saved_bytes", "saved_extra_bytes", "e2e_speedup_vs_eager",
    "e2e_speedup_vs_compile", "device_speedup_vs_eager", "device_speedup_vs_compile", "device", "torch",
    "triton", "cudnn", "git_commit", "timestamp",
)
NUMERIC = (
    "ndim", "channels", "reduced", "layers", "err_rel_l2", "err_outliers", "e2e_ms", "e2e_p20_ms", "e2e_p80_ms",
    "device_ms", "host_us", "host_fwd_us", "host_bwd_us", "launches", "min_bytes", "gbps", "device_gbps",
    "copy_gbps", "pct_copy_bw", "device_pct_copy_bw", "floor_bytes", "device_pct_floor", "peak_mem_bytes",
    "saved_bytes", "saved_extra_bytes", "e2e_speedup_vs_eager", "e2e_speedup_vs_compile",
    "device_speedup_vs_eager", "device_speedup_vs_compile",
)
# Old name -> new name, for CSVs written before e2e and device time were told apart.
RENAMED = {"median_ms": "e2e_ms", "p20_ms": "e2e_p20_ms", "p80_ms": "e2e_p80_ms",
           "speedup_vs_eager": "e2e_speedup_vs_eager", "speedup_vs_compile": "e2e_speedup_vs_compile"}
# Without these a file is not a sweep's CSV (after renaming old columns).
REQUIRED = KEY + ("status", "ok", "timing", "e2e_ms", "device")
TIMES = {kind: f"{kind}_ms" for kind in TIME_KINDS}


class ResultsError(ValueError):
    """A results file that cannot be used: empty, or not written by `tritonbn-perf sweep`."""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        "timestamp": now(),
    }


def row_key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in KEY)


def read_rows(path) -> list[dict]:
    """Rows of a sweep CSV with the numeric columns as floats (NaN where empty or absent).

    Raises ResultsError for an empty file or one that lacks the sweep's columns.
    """
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [RENAMED.get(name, name) for name in reader.fieldnames or ()]
            rows = [{RENAMED.get(k, k): v for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ResultsError(f"{path} is not a CSV file ({exc})") from None
    if not header:
        raise ResultsError(f"{path} is empty")
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise ResultsError(f"{path} is not a tritonbn-perf sweep CSV: no column {', '.join(missing)}")
    if not rows:
        raise ResultsError(f"{path} holds no rows")
    for row in rows:
        for col in NUMERIC:
            value = row.get(col) or ""
            try:
                row[col] = float(value) if value else math.nan
            except ValueError:
                raise ResultsError(f"{path}: column {col} holds {value!r}, not a number") from None
        row["ok"] = row.get("ok") == "True"
        row["residual"] = row.get("residual") == "True"
        row["device_method"] = row.get("device_method") or ""
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """speedup = baseline's time / this row's time, for e2e and device time, where both rows are valid."""
    by_config = {row_key(row): row for row in rows}
    for row in rows:
        config = row_key(row)[:-1]
        for base in BASELINES:
            ref = by_config.get(config + (base,))
            for kind, column in TIMES.items():
                ok = ref is not None and ref["ok"] and row["ok"]
                row[f"{kind}_speedup_vs_{base}"] = ref[column] / row[column] if ok else math.nan


def write_rows(path, new_rows: list[dict]) -> list[dict]:
    """Merge `new_rows` into the CSV at `path` (created if missing or empty) and return the merged table."""
    old = read_rows(path) if os.path.exists(path) and os.path.getsize(path) else []
    merged = {row_key(r): r for r in old}
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
        writer.writerows({k: _format(v) for k, v in row.items()} for row in rows)


def check_writable_file(path) -> None:
    """Raise OSError now if `path` cannot be written, rather than after a long run has been measured.

    An existing file is opened for appending (its contents stay as they are); a new one is created and
    removed again, with the folders above it, which stay (the run will write there).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    with open(path, "a"):
        pass
    if not existed:
        path.unlink()


def check_writable_dir(path) -> None:
    """Raise OSError now if files cannot be written in the folder `path` (created if missing)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".tritonbn-perf-write-test"
    with open(probe, "w"):
        pass
    probe.unlink()
