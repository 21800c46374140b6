"""Launching a Triton kernel with as little host work per call as possible.

A ``Launcher`` is one kernel at one specialization: grid, num_warps and every integer argument are fixed by
the plan that made it, so only tensors and float scalars change from call to call. Its first call goes
through Triton's ordinary launch, ``kernel[grid](...)``, which compiles (or finds) the kernel and returns
it. Later calls on CUDA hand the arguments straight to that compiled kernel's launcher, as Triton's own
``JITFunction.run`` does after its binder, specialization key and cache look-up (about 3-4 us a launch
instead of 11-17 us on triton 3.6, by Triton's and tritonbench's maintainers' measurements; not yet
measured here).

The direct path relies on internals shared by triton 3.x releases (``CompiledKernel.run``, ``.function``,
``.packed_metadata``; launcher arguments ``grid, stream, function, metadata, launch_metadata, enter_hook,
exit_hook, *all kernel arguments``). Where they are missing (the interpreter, another Triton) or a call
differs from the compiled specialization (a pointer not 16-byte aligned, which Triton specialises on) or
launch hooks are set (profilers), the call takes the ordinary launch instead.
"""

import torch
import triton

_ALIGNMENT = 16  # Triton compiles separate variants for pointers divisible by 16 and for the others


def direct_launch_parts(compiled):
    """(run, function, packed_metadata) of a compiled kernel, or None where this Triton lacks them."""
    try:
        return compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None


def current_stream_getter():
    """Triton's ``get_current_stream(device_index)``, or None where no GPU driver is active."""
    try:
        from triton.runtime import driver

        return driver.active.get_current_stream
    except Exception:  # no driver, no GPU, or a Triton without this layout: launch the ordinary way
        return None


def _hook_active(hook) -> bool:
    # triton 3.4+ keeps hooks in a HookChain that is never None, only empty; older ones use None.
    return hook is not None and bool(getattr(hook, "calls", True))


def _launch_hooks_set() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True  # a Triton without knobs: don't second-guess its launch path
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


class Launcher:
    """``kernel`` launched on ``grid`` with ``num_warps``; called with all kernel arguments in order.

    The first ``num_tensors`` arguments are tensors; the rest (scalars and constexprs) must be those the plan
    fixed, except float scalars, which Triton does not specialise on.
    """

    __slots__ = ("kernel", "grid", "num_warps", "num_tensors", "cooperative", "_direct", "_get_stream", "_device")

    def __init__(self, kernel, grid, num_warps, num_tensors, device_index, cooperative=False):
        self.kernel = kernel
        self.grid = (grid + (1, 1))[:3]
        self.num_warps = num_warps
        self.num_tensors = num_tensors
        self.cooperative = cooperative  # every program resident at once (a grid-wide barrier waits for all)
        self._direct = None  # (run, function, packed_metadata) once the kernel is compiled
        self._get_stream = None
        self._device = device_index

    def __call__(self, *args):
        direct = self._direct
        if direct is not None and self._aligned(args) and not _launch_hooks_set():
            run, function, metadata = direct
            g0, g1, g2 = self.grid
            run(g0, g1, g2, self._get_stream(self._device), function, metadata, None, None, None, *args)
            return
        options = {"launch_cooperative_grid": True} if self.cooperative else {}
        compiled = self.kernel[self.grid](*args, num_warps=self.num_warps, **options)
        if direct is None and compiled is not None and self._device is not None and self._aligned(args):
            self._enable_direct(compiled)

    def _aligned(self, args) -> bool:
        return all(t.data_ptr() % _ALIGNMENT == 0 for t in args[: self.num_tensors])

    def _enable_direct(self, compiled):
        parts = direct_launch_parts(compiled)
        get_stream = current_stream_getter()
        if parts is not None and get_stream is not None:
            self._get_stream = get_stream
            self._direct = parts


def stream_of(device_index):
    """The raw handle of device ``device_index``'s current CUDA stream, or None off CUDA."""
    if device_index is None:
        return None
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's own launcher calls
    if get_raw is not None:
        return get_raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream
