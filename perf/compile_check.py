"""Compile, without a GPU, every kernel specialization the plans would launch on a GPU: each configuration the
tuning table can pick (the candidates of `tritonbn-perf tune`) and the heuristic's, over ResNet-50's shapes and
a few odd ones, every dtype, both memory formats, every launch of every direction, and every activation.

The plans run on CPU tensors as if on a GPU of ``multiprocessors`` SMs; each launch is replaced by Triton's own
``warmup`` (argument binding and specialization exactly as a launch, then compilation to machine code, no
launch) under a stand-in driver that names the compile target. What this proves: every variant compiles for
the target with this Triton, with the argument count and specialization a real launch has. What it cannot:
that the kernels run correctly or fast there (the suite checks the first under the interpreter; a GPU run the
second). It needs compiled kernels: run it without TRITON_INTERPRET.

``resources`` adds what ptxas itself reports of each compiled kernel (registers and spill bytes per thread): the
one view of a kernel's cost on the device that needs no GPU, and the reason for the candidates' per-thread tile limit
(kernels/configs.py).
"""

import contextlib
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from tritonbn import plans
from tritonbn.activations import ACTIVATIONS, KERNEL_IDS

from .shapes import preset_shapes

# Shapes beyond ResNet-50's: odd channel counts and spatial sizes (specializations without 16-divisibility),
# 2-D input, and a 5-D one.
ODD_SHAPES = [(8, 3, 7, 7), (5, 12), (4, 6, 3, 5, 7)]
DTYPES = (torch.bfloat16, torch.float32, torch.float16, torch.float64)


class _CompileOnlyDriver:
    """The little of Triton's GPU driver that binding and compiling use: the target, a device and a stream."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@contextlib.contextmanager
def gpu_target(arch: int, multiprocessors: int):
    """Plan for, and compile to, a GPU of compute capability ``arch`` with ``multiprocessors`` SMs."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from tritonbn.kernels import backward, configs, forward, grouped, plan

    compiled = []

    def warmup_all(kernel_plan, direct, tensors, floats):  # what launch_all would launch, compiled instead
        for launcher, tail in kernel_plan.launches:
            compiled.append(launcher.kernel.warmup(*tensors, *floats, *tail, grid=launcher.grid, **launcher.options))

    saved = plan.multiprocessors, forward.launch_all
    previous = driver._active  # None until a driver was first asked for; there may be none to create here
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    plan.multiprocessors = lambda device: multiprocessors
    forward.launch_all = backward.launch_all = grouped.launch_all = warmup_all
    plans.clear()
    try:
        with configs.as_gpu():  # the heuristic's GPU tiles, not the interpreter's, where no configuration is given
            yield compiled
    finally:
        plan.multiprocessors, forward.launch_all = saved
        backward.launch_all = grouped.launch_all = saved[1]
        driver.set_active(previous)
        plans.clear()


def _tensor(shape, dtype, fmt):
    t = torch.empty(shape, dtype=dtype)
    if fmt == "nhwc":
        t = t.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return t


# Gradient sets backward is asked for: training with and without a residual, the input only, parameters only.
NEEDS = ((True, True, True, False), (True, True, True, True), (True, False, False, False), (False, True, True, False))


def _run_plans(shape, dtype, fmt, activation, config, residual, needs_sets):
    """Plan (and so compile) a training forward, its backwards for ``needs_sets`` and an eval forward."""
    from tritonbn.kernels import ForwardPlan, configs

    x = _tensor(shape, dtype, fmt)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = torch.empty(shape[1], dtype=param), torch.empty(shape[1], dtype=param)
    running_mean, running_var = torch.zeros(shape[1], dtype=param), torch.ones(shape[1], dtype=param)
    r = _tensor(shape, dtype, fmt) if residual else None
    with configs.override(config) if config is not None else contextlib.nullcontext():
        if config is not None:  # a module's training call: the kernels count its batch (momentum and None)
            batches = torch.zeros((), dtype=torch.int64)
            for counting, momentum in ((1, 0.1), (2, None)):
                ForwardPlan(x, weight, bias, r, running_mean, running_var, True, KERNEL_IDS[activation],
                            counting=counting)(x, weight, bias, r, running_mean, running_var, momentum, 1e-5, 0.01,
                                               batches)
        for training in (True, False):
            plan = ForwardPlan(x, weight, bias, r, running_mean, running_var, training, KERNEL_IDS[activation])
            _, workspace = plan(x, weight, bias, r, running_mean, running_var, 0.1, 1e-5, 0.01)
            for needs in needs_sets:
                if needs[3] and r is None:
                    continue
                plan.backward_plan(x, weight, bias, r, needs)(x, x, workspace, weight, bias, r, running_mean,
                                                               running_var, 1e-5, 0.01)
    if config is None:
        _run_sync_pieces(x, weight, bias, r, running_mean, running_var, activation, needs_sets)


def _run_sync_pieces(x, weight, bias, residual, running_mean, running_var, activation, needs_sets):
    """SyncBatchNormAct's kernel pieces (kernels/grouped.py) for a group of two: this rank's moments, the
    normalisation from the gathered ones (momentum and momentum=None), the gradient sums and the input gradient."""
    from tritonbn.kernels import grouped

    gathered = grouped.local_moments(x).repeat(2)  # two ranks' moments, as all_gather lays them out
    for momentum in (0.1, torch.ones((), dtype=torch.int64)):
        grouped.normalize(x, gathered, weight, bias, residual, running_mean, running_var, momentum, 1e-5, activation,
                          0.01)
    for needs in needs_sets:
        if needs[3] and residual is None:
            continue
        sums, _, _, dresidual = grouped.grad_sums(x, x, gathered, weight, bias, residual, 1e-5, activation, 0.01, needs)
        if needs[0]:
            grouped.input_grad(x, x, gathered, weight, bias, residual, dresidual, sums, 1e-5, activation, 0.01,
                               needs)


def _runs(dtypes, formats, multiprocessors):
    """(shape, dtype, format, activation, configuration or None for the heuristic's, residual, gradient sets).

    Every candidate configuration of every shape (bf16 and fp32, the dtypes GPUs train in) with a residual and
    all gradients; and, on one shape per dtype and format, every activation and every gradient set.
    """
    from tritonbn.kernels import configs
    from tritonbn.kernels.plan import LAYOUT_NAMES, layout_family, ncs_strides, spatial_size

    shapes = [case.shape for case in preset_shapes("resnet50", 64)] + ODD_SHAPES
    for shape in shapes:
        for dtype in dtypes:
            for fmt in formats:
                if fmt == "nhwc" and len(shape) < 4:
                    continue
                x = _tensor(shape, dtype, fmt)
                N, C, S = shape[0], shape[1], spatial_size(shape)
                layout = LAYOUT_NAMES[layout_family(N, S, [ncs_strides(shape, x.stride())])]
                if dtype in (torch.bfloat16, torch.float32):
                    chosen = []
                    for direction in configs.DIRECTIONS:
                        chosen += [c for c in configs.candidates(direction, dtype, layout, N, C, S, multiprocessors)
                                   if c not in chosen]
                    for config in chosen:
                        yield shape, dtype, fmt, "relu", config, True, NEEDS[1:2]
                if shape == shapes[0]:
                    for activation in ACTIVATIONS:
                        for residual in (False, True):
                            yield shape, dtype, fmt, activation, None, residual, NEEDS


def _ptxas(arch: int) -> str:
    """The ptxas Triton ships and compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas_report(ptxas: str, ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) per thread, as ptxas -v reports them for ``ptx``."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        log = subprocess.run([ptxas, "-v", f"--gpu-name={target}", source.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(registers.group(1)) if registers else 0, *(int(v) for v in (spills.groups() if spills else (0, 0))))


def _constants(kernel) -> dict:
    """A compiled kernel's constexpr arguments by name (Triton keys them by name or by (index,))."""
    names = list(kernel.src.signature)
    return {key if isinstance(key, str) else names[key[0]]: value for key, value in kernel.src.constants.items()}


def resources(kernels, arch: int, workers: int = 2) -> list[dict]:
    """One row per distinct kernel: its tile (constexprs), warps, the pointer dtype of its first argument, elements
    a thread holds per tile, and the registers and spill bytes per thread ptxas reports for it."""
    ptxas = _ptxas(arch)
    kernels = list({kernel.hash: kernel for kernel in kernels}.values())
    with ThreadPoolExecutor(workers) as pool:
        reports = list(pool.map(lambda kernel: _ptxas_report(ptxas, kernel.asm["ptx"]), kernels))
    rows = []
    for kernel, (registers, spill_stores, spill_loads) in zip(kernels, reports):
        const, warps = _constants(kernel), kernel.metadata.num_warps
        tile = const.get("BLOCK_R", 1) * const.get("BLOCK_C", 1)
        rows.append({"kernel": kernel.name, "dtype": next(iter(kernel.src.signature.values())).lstrip("*"),
                     "phase": const.get("PHASE"), "layout": const.get("LAYOUT"), "block_r": const.get("BLOCK_R"),
                     "block_c": const.get("BLOCK_C"), "block_s": const.get("BLOCK_S"), "num_warps": warps,
                     "elements_per_thread": tile // (32 * warps), "registers": registers,
                     "spill_stores": spill_stores, "spill_loads": spill_loads})
    return rows


def check(arch=90, multiprocessors=132, dtypes=DTYPES, formats=("nchw", "nhwc"), progress=print,
          with_resources=False) -> dict:
    """Compile every specialization; return counts, failures, how many kernels' PTX has vector loads and, with
    ``with_resources``, every distinct kernel's registers and spills (``resources``)."""
    from tritonbn import backend

    if backend.kernels_interpreted():
        raise RuntimeError("compile-check needs compiled kernels: run it without TRITON_INTERPRET")
    failures, started = [], time.perf_counter()
    runs = list(_runs(dtypes, formats, multiprocessors))
    with gpu_target(arch, multiprocessors) as compiled:
        for done, (shape, dtype, fmt, activation, config, residual, needs) in enumerate(runs, 1):
            try:
                _run_plans(shape, dtype, fmt, activation, config, residual, needs)
            except Exception as exc:  # one failure must not hide the others
                failures.append(f"{shape} {dtype} {fmt} {activation} residual={residual} {config}: "
                                f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
            if done % 20 == 0 or done == len(runs):
                progress(f"{done}/{len(runs)} runs, {len(compiled)} launches compiled, {len(failures)} failures, "
                         f"{time.perf_counter() - started:.0f} s")
    kernels = {id(k): k for k in compiled if k is not None}.values()
    vector_loads = sum(bool(re.search(r"ld\.global(\.\w+)*\.v[248]", k.asm["ptx"])) for k in kernels)
    report = {"runs": len(runs), "launches": len(compiled), "kernels": len(kernels),
              "with_vector_loads": vector_loads, "failures": failures}
    if with_resources:
        progress(f"ptxas -v on {len(kernels)} kernels")
        report["resources"] = resources(kernels, arch)
    report["seconds"] = time.perf_counter() - started
    return report
