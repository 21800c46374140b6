"""`tritonbn-perf tune`: pick each shape's kernel configuration by measurement and write the tuning table.

For every shape of the presets, dtype, layout and direction (training forward `fwd`, `bwd`, `eval`), each
candidate configuration (`tritonbn.kernels.configs.candidates`: the heuristic's, tile and warp variations,
the merge variant, the previous release's kernels, the persistent variant where it fits) is checked against
float64 PyTorch as the sweep checks a backend, then timed on the device alone (CUDA-graph replay, calls back
to back). The fastest correct one goes into the table, for a range of channel and row counts around the
shape; the heuristic's configuration is always among those timed, so the table never picks a slower one.
Every candidate is one CSV row.

On a CPU the same command checks every candidate an H100 or H200 would compare for correctness, under the
interpreter, at small shapes, and writes no table (there is no GPU to tune for).
"""

import contextlib
import dataclasses
import json
import math
import time

import torch

from tritonbn import plans
from tritonbn.kernels import configs
from tritonbn.kernels.plan import LAYOUT_NAMES, layout_family, multiprocessors, ncs_strides, spatial_size

from . import bandwidth, checks, results, sweep
from .backends import Backend, tritonbn_batch_norm_act
from .shapes import preset_shapes

MODE_OF = {"fwd": "fwd", "bwd": "bwd", "eval": "eval"}  # the sweep mode that times each direction
# A table entry covers channel and row counts within this factor of the tuned shape's (ResNet stages are 2x
# apart in channels and 4x in rows, so neighbouring entries never overlap).
RANGE_FACTOR = math.sqrt(2)


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    shape: tuple[int, ...]
    dtype: str
    layout: str  # the sweep's memory layout: nchw or nhwc
    direction: str


def cases(presets, batch, dtypes, layouts, directions) -> list[Case]:
    """Every case, grouped by (dtype, layout) in the order given: a budget that runs out leaves the last out."""
    out = []
    for dtype in dtypes:
        for layout in layouts:
            for preset in presets:
                for shape_case in preset_shapes(preset, batch):
                    if layout == "nhwc" and len(shape_case.shape) < 4:
                        continue
                    out += [Case(preset, shape_case.shape, dtype, layout, d) for d in directions]
    return out


def kernel_layout(case: Case) -> str:
    """The layout family the kernels see for the case's memory layout."""
    x = torch.empty(case.shape, device="meta").contiguous(memory_format=sweep.memory_format(case.layout,
                                                                                              len(case.shape)))
    return LAYOUT_NAMES[layout_family(case.shape[0], spatial_size(case.shape), [ncs_strides(case.shape, x.stride())])]


# On a CPU, the candidates checked are those a GPU of this many SMs (an H100's or H200's) would compare.
CPU_STANDS_FOR_MULTIPROCESSORS = 132


def candidates_for(case: Case, device: torch.device) -> list[configs.KernelConfig]:
    N, C, S = case.shape[0], case.shape[1], spatial_size(case.shape)
    sms = multiprocessors(device) or CPU_STANDS_FOR_MULTIPROCESSORS
    return configs.candidates(case.direction, sweep.TORCH_DTYPES[case.dtype], kernel_layout(case), N, C, S, sms)


def measure(case: Case, config: configs.KernelConfig, device: torch.device, inputs, reference) -> dict:
    """One candidate's row: correct or not (and why), and its device time on CUDA."""
    from .breakdown import _graph_replay_ms

    cfg = sweep.Config(case.preset, sweep.ShapeCase(case.shape), case.dtype, case.layout, "relu", False,
                       MODE_OF[case.direction])
    backend = Backend("tritonbn", tritonbn_batch_norm_act)
    row = {"ok": False, "status": "", "err_rel_l2": math.nan, "device_ms": math.nan}
    plans.clear()
    try:
        with configs.override(config):
            verdict = checks.compare(sweep.Call(backend, cfg, inputs).outputs(), reference, case.dtype)
            row.update(ok=verdict.ok, status="ok" if verdict.ok else f"mismatch: {verdict.problem}",
                       err_rel_l2=verdict.rel_l2)
            if verdict.ok and device.type == "cuda":
                call = sweep.Call(backend, cfg, inputs)
                call.prepare()
                row["device_ms"] = _graph_replay_ms(call.step, device, rep_ms=20.0, replays=5)
    except Exception as exc:  # a candidate that cannot run (a persistent grid too large, say) is recorded
        row["status"] = " ".join(f"error: {type(exc).__name__}: {exc}".split())[:300]
    finally:
        plans.clear()
    return row


def precompile(tune_cases: list[Case], device: torch.device, workers: int, progress=print) -> None:
    """Compile every candidate's kernels first, in ``workers`` processes, as `tritonbn-perf compile-check` does
    (CPU tensors, a stand-in driver naming this GPU's target): Triton's on-disk cache then serves the timed
    runs, which would otherwise compile one kernel after another."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    major, minor = torch.cuda.get_device_capability(device)
    jobs = list(dict.fromkeys((case.shape, case.dtype, case.layout, config) for case in tune_cases
                              for config in candidates_for(case, device)))
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_compile_worker,
                             initargs=(10 * major + minor, multiprocessors(device))) as pool:
        failed = [job for job, ok in zip(jobs, pool.map(_compile_job, jobs, chunksize=4)) if not ok]
    progress(f"precompiled {len(jobs)} candidate plans in {time.perf_counter() - started:.0f} s with {workers} "
             f"processes ({len(failed)} failed to compile; they fail again, with their reason, when checked)")


def _compile_worker(arch: int, sms: int) -> None:
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    from . import compile_check

    compile_check.gpu_target(arch, sms).__enter__()  # for the life of this worker process


def _compile_job(job) -> bool:
    from . import compile_check

    shape, dtype, layout, config = job
    try:
        compile_check._run_plans(shape, sweep.TORCH_DTYPES[dtype], layout, "relu", config, False,
                                 compile_check.NEEDS[:1])
    except Exception:
        return False
    return True


def _group(case: Case) -> tuple[str, str]:
    return case.dtype, case.layout


def floor_fraction(case: Case, device_ms: float, copy_gbps: float) -> float:
    """Device time of the memory floor (bandwidth.floor_passes at the measured copy bandwidth) over the time."""
    numel = math.prod(case.shape)
    itemsize = torch.empty((), dtype=sweep.TORCH_DTYPES[case.dtype]).element_size()
    floor = bandwidth.floor_passes(MODE_OF[case.direction], False, "relu") * numel * itemsize
    return bandwidth.effective_gbps(floor, device_ms) / copy_gbps


def run(tune_cases: list[Case], device: torch.device, budget_s: float | None = None, progress=print,
        compile_workers: int = 0) -> list[dict]:
    """Measure every candidate of every case (until ``budget_s`` runs out, precompiling included); one row per
    candidate."""
    torch.manual_seed(0)
    started, rows = time.perf_counter(), []
    env = results.environment(device)
    copy_gbps = bandwidth.copy_bandwidth_gbps(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for number, case in enumerate(tune_cases, 1):
        if budget_s is not None and time.perf_counter() - started > budget_s:
            progress(f"budget of {budget_s:.0f} s spent: {len(tune_cases) - number + 1} cases left untuned")
            break
        group = (case.dtype, case.layout)
        if compile_workers and device.type == "cuda" and (number == 1 or group != _group(tune_cases[number - 2])):
            precompile([c for c in tune_cases if _group(c) == group], device, compile_workers, progress)
        cfg = sweep.Config(case.preset, sweep.ShapeCase(case.shape), case.dtype, case.layout, "relu", False,
                           MODE_OF[case.direction])
        inputs = sweep.make_inputs(cfg, device)
        reference = sweep.reference_outputs(cfg, inputs)
        found = candidates_for(case, device)
        case_rows = []
        for index, config in enumerate(found):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                measured = measure(case, config, device, inputs, reference)
            case_rows.append({**dataclasses.asdict(case), "shape": "x".join(map(str, case.shape)),
                              "channels": case.shape[1], "rows": case.shape[0] * spatial_size(case.shape),
                              "kernel_layout": kernel_layout(case), "candidate": index, "heuristic": index == 0,
                              **{f"config_{k}": v for k, v in config.as_dict().items()}, **measured,
                              "pct_floor": 100 * floor_fraction(case, measured["device_ms"], copy_gbps),
                              "copy_gbps": copy_gbps, "picked": False, **env})
        timed = [r for r in case_rows if r["ok"] and not math.isnan(r["device_ms"])]
        if timed:
            min(timed, key=lambda r: r["device_ms"])["picked"] = True
        rows += case_rows
        bad = [r for r in case_rows if not r["ok"]]
        progress(f"[{number}/{len(tune_cases)}] {case.direction} {case.dtype} {case.layout} "
                 f"{'x'.join(map(str, case.shape))}: {len(case_rows) - len(bad)}/{len(case_rows)} candidates correct"
                 + "".join(f"\n  candidate {r['candidate']}: {r['status']}" for r in bad))
    return rows


def table_entries(rows: list[dict]) -> list[dict]:
    """The tuning table's entries for the picked rows: configuration and the ranges it covers."""
    entries = []
    for row in rows:
        if not row["picked"]:
            continue
        config = {k.removeprefix("config_"): row[k] for k in row if k.startswith("config_")}
        entries.append({
            "gpu": row["device"], "direction": row["direction"], "dtype": row["dtype"],
            "layout": row["kernel_layout"],
            "c_min": math.floor(row["channels"] / RANGE_FACTOR), "c_max": math.ceil(row["channels"] * RANGE_FACTOR),
            "r_min": math.floor(row["rows"] / RANGE_FACTOR), "r_max": math.ceil(row["rows"] * RANGE_FACTOR),
            "config": config, "device_ms": row["device_ms"],
            "heuristic_ms": next(r["device_ms"] for r in rows if r["heuristic"] and _same_case(r, row)),
        })
    return entries


def case_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("shape", "dtype", "layout", "direction"))


def _same_case(a: dict, b: dict) -> bool:
    return case_key(a) == case_key(b)


def write_table(entries: list[dict], path) -> None:
    """Merge ``entries`` into the table at ``path``: they replace what it held for the same GPU, direction,
    dtype, layout and ranges; entries for other GPUs and cases stay."""
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        table = {"entries": []}
    keys = {_entry_key(e) for e in entries}
    kept = [e for e in table["entries"] if _entry_key(e) not in keys]
    table["entries"] = kept + entries
    table["written_by"] = "tritonbn-perf tune"
    path.write_text(json.dumps(table, indent=1) + "\n")


def _entry_key(entry: dict) -> tuple:
    return tuple(entry[k] for k in ("gpu", "direction", "dtype", "layout", "c_min", "c_max", "r_min", "r_max"))
