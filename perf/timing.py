"""Timing that is honest about what it measures.

On CUDA: CUDA events through `triton.testing.do_bench` (warm-up, L2 flushed between runs), median with
p20/p80. Elsewhere: wall-clock medians of a few runs, labelled so that no report presents them as
performance: `interpreter` when Triton kernels run under TRITON_INTERPRET=1, `cpu-reference` otherwise.
"""

import statistics
import time

import torch

CUDA_EVENTS = "cuda-events"
INTERPRETER = "interpreter"
CPU_REFERENCE = "cpu-reference"


def timing_label(device: torch.device) -> str:
    from tritonbn.functional import _uses_kernels

    if device.type == "cuda":
        return CUDA_EVENTS
    return INTERPRETER if _uses_kernels(torch.empty(0, device=device)) else CPU_REFERENCE


def measure(fn, device: torch.device, cpu_runs: int = 3) -> tuple[float, float, float]:
    """(median, p20, p80) of `fn`'s run time in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    fn()  # warm-up: first-call costs (interpreter rewriting, compilation) are not the steady state
    times = []
    for _ in range(cpu_runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=5, method="inclusive")  # cut points at 20/40/60/80 %
    return statistics.median(times), quantiles[0], quantiles[-1]
