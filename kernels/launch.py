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
exit_hook, *all kernel arguments``). Where they are missing (the interpreter, another Triton), or a call's
pointers differ from the compiled specialization (one not 16-byte aligned: Triton specialises on that), or
launch hooks are set (profilers), the call takes the ordinary launch instead: the plan decides that once per
call for all its launches (``direct_stream``). Once every launcher of a plan is compiled, a direct call passes
its tensors' device addresses rather than the tensors (``addresses``, ``launch_all``).
"""

import functools

import torch
import triton

from .plan import counters

_ALIGNMENT = 16  # Triton compiles separate variants for pointers divisible by 16 and for the others
_DATA_PTR = torch.Tensor.data_ptr


def direct_launch_parts(compiled):
    """(run, function, packed_metadata) of a compiled kernel, or None where this Triton lacks them."""
    try:
        return compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None


def _hook_active(hook) -> bool:
    # triton 3.4+ keeps hooks in a HookChain that is never None, only empty; older ones use None.
    return hook is not None and bool(getattr(hook, "calls", True))


def _launch_hooks_set() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True  # a Triton without knobs: don't second-guess its launch path
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


def addresses(tensors) -> tuple:
    """The tensors' device addresses, for launches that go straight to compiled kernels. Triton's launcher takes a
    plain int for a pointer argument as it is; from a tensor it reads the address itself, with a Python call to
    ``data_ptr`` and a driver call (``cuPointerGetAttribute``) per pointer argument of every launch (triton 3.6's
    generated launcher and 3.9's ``extractPointer`` alike). A plan reads them once per call for all its
    launches, and only where every launcher is compiled already (``Launcher.is_direct``): an ordinary launch
    binds its arguments and would take an int for a scalar."""
    return tuple(map(_DATA_PTR, tensors))


def launch_all(plan, direct, tensors, floats) -> None:
    """Every (launcher, integer arguments) of ``plan.launches``, on stream ``direct`` (see ``direct_stream``) with
    the pointer arguments ``tensors`` and the float scalars ``floats``; once every launcher of the plan is compiled
    (``plan.direct_ready``), with the tensors' addresses in their place (see ``addresses``), straight to the
    compiled kernels' launchers (``plan.direct_launches``: each launch's handles, gathered once). Without a stream
    the launches are Triton's ordinary ones, made here without the Launcher's own frame."""
    if direct is None:
        for launcher, tail in plan.launches:
            launcher.ordinary(*tensors, *floats, *tail)
        return
    if plan.direct_ready:
        args = addresses(tensors) + floats
        for run, g0, g1, g2, function, metadata, tail in plan.direct_launches:
            run(g0, g1, g2, direct, function, metadata, None, None, None, *args, *tail)
        return
    for launcher, tail in plan.launches:
        launcher(direct, *tensors, *floats, *tail)
    if all(launcher.is_direct for launcher, _ in plan.launches):
        plan.direct_launches = [(*launcher.direct_parts[:1], *launcher.grid, *launcher.direct_parts[1:], tail)
                                for launcher, tail in plan.launches]
        plan.direct_ready = True


def direct_stream(stream, tensors):
    """``stream`` if this call's launches may go straight to the compiled kernels, else None: the caller's own
    tensors (the plan's buffers are the allocator's, always aligned) are 16-byte aligned and no launch hook
    is set. Tensors may be None."""
    if stream is None or _launch_hooks_set():
        return None
    for t in tensors:
        if t is not None and t.data_ptr() % _ALIGNMENT:
            return None
    return stream


class Launcher:
    """``kernel`` launched on ``grid`` with ``num_warps``; called as ``launcher(stream, *kernel arguments)``.

    ``stream`` is the raw CUDA stream to launch directly on (see ``direct_stream``), or None for Triton's
    ordinary launch. Arguments other than tensors and float scalars must be those the plan fixed.
    """

    __slots__ = ("kernel", "grid", "options", "ordinary", "direct_parts")

    def __init__(self, kernel, grid, num_warps, cooperative=False):
        self.kernel = kernel
        self.grid = (grid + (1, 1))[:3]
        # cooperative: every program resident at once (a grid-wide barrier waits for all of them)
        self.options = {"num_warps": num_warps, **({"launch_cooperative_grid": True} if cooperative else {})}
        # Triton's ordinary launch for this grid and these options, made once: ``kernel.run``, which
        # ``kernel[grid](...)`` reaches through one more Python frame
        self.ordinary = functools.partial(kernel.run, grid=self.grid, warmup=False, **self.options)
        self.direct_parts = None  # (run, function, packed_metadata) once compiled and launched directly

    @property
    def is_direct(self) -> bool:
        """Whether calls with a stream launch the compiled kernel directly (it was compiled and has the handles)."""
        return self.direct_parts is not None

    def __call__(self, stream, *args):
        direct = self.direct_parts
        if direct is not None and stream is not None:
            run, function, metadata = direct
            g0, g1, g2 = self.grid
            run(g0, g1, g2, stream, function, metadata, None, None, None, *args)
            return
        compiled = self.ordinary(*args)
        if direct is None and stream is not None and compiled is not None:
            self.direct_parts = direct_launch_parts(compiled)


def _current_stream_object(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# What Triton's own launcher calls for the current stream's raw handle; the public way where this PyTorch lacks it.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _current_stream_object)


def current_stream(device_index):
    """The raw handle of device ``device_index``'s current CUDA stream, or None off CUDA."""
    return None if device_index is None else _raw_stream(device_index)


def stream_free_counters(plan):
    """The counters a plan's interpreted launches use (no streams there), or None: what ``call_state`` returns."""
    return counters(plan.device, None, plan.counter_slots) if plan.index is None and plan.counter_slots else None


def call_state(plan, tensors):
    """(stream, counters) of one call of ``plan``: the stream to launch straight to the compiled kernels on, or
    None (off CUDA, or where ``direct_stream`` finds a reason among the caller's ``tensors``), and the ticket
    counters of the stream the call runs on, or None where the plan needs none. One call where a plan would make
    three, as the plan makes it on every call. Interpreted (a CPU), the counters are ``plan.idle_counters``, found
    once (``stream_free_counters``)."""
    if plan.index is None:  # interpreted: no streams, so the plan's one set of counters
        return None, plan.idle_counters
    stream = _raw_stream(plan.index)
    slots = plan.counter_slots
    return direct_stream(stream, tensors), (counters(plan.device, stream, slots) if slots else None)
