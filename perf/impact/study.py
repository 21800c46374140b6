"""The study itself: plan every training run, train them (in worker processes on a CPU), time the steps,
judge the claims and write the report, under the BN path the study asked for."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from .claims import ClaimRow, Results, analyse, landscape_summary
from .config import StudyConfig
from .data import DigitSplit, load_digit_split
from .models import COMPARED_ARMS, INTERVENTION_ARMS
from .report import StudyInfo, render_report, write_results_json
from .training import RunResult, RunSpec, time_steps, train_run


def plan_runs(config: StudyConfig) -> list[RunSpec]:
    """Every training run the study needs, each once: the LR sweep (init scale 1), the init-scale sweep
    (base LR) and the baseline runs (base LR, scale 1; with ICS and the loss landscape for bn, plain and
    noisy BN, plus the dropout arm). The probed runs come first: they take longest, and starting them
    first keeps the worker processes busy until the end."""
    specs: dict[tuple, RunSpec] = {}

    def add(spec: RunSpec) -> None:
        key = (spec.model_kind, spec.arm, spec.lr, spec.init_scale, spec.seed)
        if spec.measure_ics or key not in specs:
            specs[key] = spec

    for kind in config.models:
        for seed in config.seeds:
            for arm in COMPARED_ARMS:
                for lr in config.lrs:
                    add(RunSpec(kind, arm, lr, 1.0, seed))
                for scale in config.init_scales:
                    add(RunSpec(kind, arm, config.base_lr, scale, seed))
            for arm in INTERVENTION_ARMS:
                add(RunSpec(kind, arm, config.base_lr, 1.0, seed, measure_ics=True, measure_landscape=True))
            if config.dropout > 0:
                add(RunSpec(kind, "dropout", config.base_lr, 1.0, seed))
    return sorted(specs.values(), key=lambda spec: not spec.measure_ics)


@contextlib.contextmanager
def study_environment(device: torch.device, kernels: bool) -> Iterator[str]:
    """Enter the BN path and CPU float mode the study trains under; yields a description of the path.

    CUDA always runs the fused kernels. A CPU runs the reference path unless `kernels` asks for the Triton
    interpreter (TRITON_INTERPRET=1 before triton is imported), which is exact but makes each run take
    minutes. On CPU, denormals are flushed to zero: late in training the tiny gradients of these nets
    turn denormal and slow CPU convolutions down some 50-fold, which would swamp every timing."""
    from tritonbn import backend

    if kernels and device.type == "cpu" and not backend.kernels_interpreted():
        raise RuntimeError("--kernels on a CPU needs TRITON_INTERPRET=1 set before triton is imported")
    path = backend.cpu_reference() if device.type == "cpu" and not kernels else contextlib.nullcontext()
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        with path:
            yield describe_bn_path(device)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def describe_bn_path(device: torch.device) -> str:
    """Which path tritonbn's BN modules take for a tensor on `device` in the current context."""
    from tritonbn import backend

    if not backend.uses_kernels(torch.empty(0, device=device)):
        return "PyTorch reference path (tritonbn.reference)"
    return "fused Triton kernels" + (" under the Triton interpreter" if device.type == "cpu" else "")


_WORKER: dict = {}  # a worker process's data and settings, set once by _start_worker


def _start_worker(config: StudyConfig, kernels: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(config=config, kernels=kernels,
                   data=load_digit_split("cpu", config.split_seed, config.test_fraction))


def _train_in_worker(spec: RunSpec) -> RunResult:
    with study_environment(torch.device("cpu"), _WORKER["kernels"]):
        return train_run(_WORKER["data"], spec, _WORKER["config"])


def train_all(specs: Sequence[RunSpec], data: DigitSplit, config: StudyConfig, bar, *, kernels: bool,
              workers: int, threads: int) -> list[RunResult]:
    """Every run, in `specs` order. On a CPU the runs are spread over `workers` processes, because nets
    this small gain little from intra-op threads; each run seeds itself, so the results do not depend
    on the number of workers. The caller is inside `study_environment`."""
    if workers <= 1 or data.x_train.device.type != "cpu":
        runs = []
        for spec in specs:
            bar.set_postfix_str(f"{spec.model_kind} {spec.arm} lr={spec.lr:g} scale={spec.init_scale:g}")
            runs.append(train_run(data, spec, config))
            bar.update()
        return runs
    bar.set_postfix_str(f"{workers} worker processes")
    spawn = multiprocessing.get_context("spawn")  # a forked child would inherit torch's thread pool state
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_start_worker,
                             initargs=(config, kernels, threads)) as pool:
        futures = [pool.submit(_train_in_worker, spec) for spec in specs]
        for _ in as_completed(futures):
            bar.update()
        return [future.result() for future in futures]


def run_study(config: StudyConfig, device: torch.device, out_dir: Path, *, kernels: bool = False,
              workers: int = 1, threads: int = 1, progress: bool = True) -> tuple[list[ClaimRow], Path]:
    """Run every training run and the timing, write results.json, the plots and impact.md."""
    from tqdm import tqdm

    from . import plots  # matplotlib, like tqdm, is only needed once a study runs

    specs = plan_runs(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with study_environment(device, kernels) as bn_path, tqdm(
                total=len(specs) + len(config.models), desc="impact", unit="run", disable=not progress) as bar:
            data = load_digit_split(device, config.split_seed, config.test_fraction)
            runs = train_all(specs, data, config, bar, kernels=kernels, workers=workers, threads=threads)
            timings = {}
            for kind in config.models:  # after training, so that no worker competes with the clock
                bar.set_postfix_str(f"{kind} timing")
                timings[kind] = time_steps(data, kind, config)
                bar.update()
    finally:
        torch.set_num_threads(previous_threads)
    results = Results(runs, config)
    rows = analyse(results, timings)
    plots.write_all(results, timings, out_dir, f"{device.type}, {threads} thread(s)\n{bn_path}")
    info = StudyInfo(device.type, bn_path, kernels, workers, threads, len(specs), time.perf_counter() - started)
    write_results_json(out_dir / "results.json", config, runs, timings, info)
    report = out_dir / "impact.md"
    landscape = {kind: {arm: landscape_summary(results, kind, arm) for arm in INTERVENTION_ARMS}
                 for kind in config.models}
    report.write_text(render_report(rows, config, info, landscape))
    return rows, report
