"""End-to-end timing that is honest about what it measures.

On CUDA: CUDA events through `triton.testing.do_bench` (warm-up, L2 flushed between runs), median with
p20/p80; a call whose host work outlasts its kernels is timed with those host stalls included. Elsewhere:
wall-clock medians of a few runs, labelled by what ran, so that no report presents them as performance:
`interpreter` when tritonbn's kernels run under Triton's interpreter, `cpu-reference` when tritonbn's CPU
tensors take the PyTorch reference path (as they do in a process whose kernels were compiled for a GPU),
`cpu-pytorch` for PyTorch's own CPU code (the eager and compile backends, a network without tritonbn).
`tritonbn.backend` says which path tritonbn takes, as it decided for the whole process. `breakdown` splits
the time into host and device parts.
"""

import statistics
import time

import torch

CUDA_EVENTS = "cuda-events"
INTERPRETER = "interpreter"
CPU_REFERENCE = "cpu-reference"
CPU_PYTORCH = "cpu-pytorch"
MEANINGS = {CUDA_EVENTS: "CUDA events around each call, on a GPU",
            INTERPRETER: "wall time on a CPU, tritonbn's kernels under Triton's interpreter",
            CPU_REFERENCE: "wall time on a CPU, tritonbn's PyTorch reference path",
            CPU_PYTORCH: "wall time on a CPU, PyTorch's own CPU code"}


def timing_label(device: torch.device, tritonbn: bool = True) -> str:
    """How a call on `device` is timed, and on a CPU what runs in it: tritonbn (`tritonbn` True) or only
    PyTorch's own code."""
    from tritonbn import backend

    if device.type == "cuda":
        return CUDA_EVENTS
    if not tritonbn:
        return CPU_PYTORCH
    return INTERPRETER if backend.uses_kernels(torch.empty(0, device=device)) else CPU_REFERENCE


def summarize(times_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a few wall-clock samples."""
    quantiles = statistics.quantiles(times_ms, n=5, method="inclusive")  # cut points at 20/40/60/80 %
    return statistics.median(times_ms), quantiles[0], quantiles[-1]


def measure(fn, device: torch.device, cpu_runs: int = 3, warmup_ms: int = 25, rep_ms: int = 100,
            cpu_warmup: bool = True) -> tuple[float, float, float]:
    """(median, p20, p80) of `fn`'s run time in milliseconds; on CUDA over about `rep_ms` of runs.

    On a CPU one unmeasured run comes first unless `cpu_warmup` is False (the caller has just run `fn`).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    if cpu_warmup:
        fn()  # first-call costs (interpreter rewriting, compilation) are not the steady state
    times = []
    for _ in range(cpu_runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)
