"""Where a call's time goes: end to end, on the device, on the host, and in how many launches.

On CUDA (`e2e` is `timing.measure`: CUDA events around each call, host stalls included):
- `device_ms`: the same call captured in a CUDA graph and replayed, calls back to back (`_graph_replay_ms`),
  so no host work and no L2 flush between calls, as in a network whose previous layer has just written
  the input. Method `cuda-graph`. A call that cannot be captured (one that waits on the host, say) gets
  the sum of its kernel times from torch.profiler: `profiler`.
- `host_us`: the wall time of N calls issued without synchronising, divided by N.
- `launches`: device activities (kernels, memsets, copies) per call, counted by torch.profiler.

On a CPU nothing runs asynchronously, so the split is made differently and labelled so:
- `interpreter`: tritonbn's kernels run under Triton's interpreter. Each launch is counted and timed:
  `device_ms` is the time inside the interpreted kernels, `host_us` the call's wall time with the launches
  skipped (outputs not computed): the Python and PyTorch work around the kernels.
- `reference`: a call that launches no Triton kernel (eager PyTorch, tritonbn's reference path) runs
  wholly on the CPU: `device_ms` and `host_us` are both its wall time, and `launches` does not apply.
"""

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .timing import INTERPRETER, measure, summarize

CUDA_GRAPH = "cuda-graph"
PROFILER = "profiler"
REFERENCE = "reference"
# CUPTI's own buffer requests appear on the device timeline; they are the profiler's, not the call's.
PROFILER_OVERHEAD = ("Activity Buffer Request",)


@dataclass(frozen=True)
class Breakdown:
    e2e_ms: float
    e2e_p20_ms: float
    e2e_p80_ms: float
    device_method: str
    device_ms: float
    host_us: float
    launches: float  # per call; NaN where not applicable


def measure_call(fn: Callable, device: torch.device) -> Breakdown:
    """Time `fn` end to end and split the time into device and host parts (see the module's docstring)."""
    return _cuda(fn, device) if device.type == "cuda" else _cpu(fn)


def host_split_us(forward: Callable, backward: Callable, device: torch.device, calls: int = 20,
                  repeats: int = 5) -> tuple[float, float]:
    """(forward, backward) host issue time per call, in microseconds: ``calls`` forwards issued back to back
    without synchronising, then the backward of each (``backward(forward's output)``); medians over
    ``repeats``. On a CPU the interpreted launches are skipped, as for `host_us`."""
    cuda = device.type == "cuda"
    synchronize = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    from tritonbn import backend

    skip = contextlib.nullcontext() if cuda or not backend.kernels_interpreted() else interpreted_launches(False)
    forward_us, backward_us = [], []
    with skip:
        outputs = [forward() for _ in range(2)]  # warm-up
        for output in outputs:
            backward(output)
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            outputs = [forward() for _ in range(calls)]
            middle = time.perf_counter()
            for output in outputs:
                backward(output)
            end = time.perf_counter()
            synchronize()
            forward_us.append((middle - start) / calls * 1e6)
            backward_us.append((end - middle) / calls * 1e6)
    return statistics.median(forward_us), statistics.median(backward_us)


def _host_issue_us(fn, synchronize, calls: int, repeats: int) -> float:
    """Median over `repeats` of the wall time of `calls` back-to-back calls, per call, in microseconds."""
    samples = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    synchronize()
    return statistics.median(samples)


# ------------------------------------------------------------------------------------------------ CUDA
def _cuda(fn, device) -> Breakdown:
    e2e = measure(fn, device)
    launches, profiled_ms = _profile(fn, device)
    try:
        device_ms, method = _graph_replay_ms(fn, device), CUDA_GRAPH
    except Exception:  # any capture failure (a host sync, an op graphs refuse) means: profile
        torch.cuda.synchronize(device)
        device_ms, method = profiled_ms, PROFILER
    # 20 calls of at most a few launches each stay far below the launch queue's depth, so the host never
    # waits for the device while issuing them.
    host = _host_issue_us(fn, lambda: torch.cuda.synchronize(device), calls=20, repeats=5)
    return Breakdown(*e2e, method, device_ms, host, launches)


def _graph_replay_ms(fn, device, rep_ms: float = 50.0, replays: int = 10) -> float:
    """Median milliseconds per call of `fn` captured in a CUDA graph (about `rep_ms` of calls back to back).

    The capture is made on the current stream, which must not be the default one (CUDA refuses to capture
    that): a backward runs on its forward's stream, so a call that differentiates a graph built before
    (the sweep's `bwd` mode) is captured whole only on the stream that built it. The sweep runs every
    backend on such a stream. Like triton.testing.do_bench_cudagraph, many calls are unrolled into one
    graph, so that the graph's own launch is spread thin.
    """
    stream = torch.cuda.current_stream(device)
    for _ in range(3):  # lazy initialisation and the allocator's first requests stay out of the graph
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, min(1000, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _profile(fn, device, calls: int = 5) -> tuple[float, float]:
    """(device activities per call, milliseconds of them per call), from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    on_device = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation
                 and e.name not in PROFILER_OVERHEAD]
    return len(on_device) / calls, sum(e.time_range.elapsed_us() for e in on_device) / calls / 1e3


# ------------------------------------------------------------------------------------------------- CPU
@dataclass
class LaunchMeter:
    launches: int = 0
    seconds: float = 0.0


@contextmanager
def interpreted_launches(run: bool = True):
    """Count Triton's interpreted launches inside the block, timing them, or skipping them if not `run`."""
    from triton.runtime import interpreter

    original = interpreter.GridExecutor.__call__
    meter = LaunchMeter()

    def launch(self, *args, **kwargs):
        meter.launches += 1
        if run:
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                meter.seconds += time.perf_counter() - start
        return None

    interpreter.GridExecutor.__call__ = launch
    try:
        yield meter
    finally:
        interpreter.GridExecutor.__call__ = original


def _cpu(fn, runs: int = 3) -> Breakdown:
    from tritonbn import backend

    if not backend.kernels_interpreted():  # no launch to meter: every call is the reference path's
        e2e = measure(fn, torch.device("cpu"), cpu_runs=runs)
        return Breakdown(*e2e, REFERENCE, e2e[0], e2e[0] * 1e3, math.nan)
    walls, kernel_ms = [], []
    with interpreted_launches() as meter:
        fn()  # warm-up: the interpreter's first-call costs are not the steady state
        for _ in range(runs):
            meter.launches, meter.seconds = 0, 0.0
            start = time.perf_counter()
            fn()
            walls.append((time.perf_counter() - start) * 1e3)
            kernel_ms.append(meter.seconds * 1e3)
    e2e = summarize(walls)
    if meter.launches == 0:
        return Breakdown(*e2e, REFERENCE, e2e[0], e2e[0] * 1e3, math.nan)
    with interpreted_launches(run=False):
        host = _host_issue_us(fn, lambda: None, calls=10, repeats=3)
    return Breakdown(*e2e, INTERPRETER, statistics.median(kernel_ms), host, float(meter.launches))
