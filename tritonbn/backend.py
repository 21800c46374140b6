"""Which code runs a call: the Triton kernels (compiled, or interpreted on a CPU) or the PyTorch reference.

Triton decides whether a kernel is compiled or interpreted once, when the kernel is defined (it reads
TRITON_INTERPRET then), so this module decides once too: the first time the question is asked, or as soon
as ``tritonbn.kernels`` is imported. Setting TRITON_INTERPRET afterwards changes nothing, for Triton as
here. CUDA tensors always run the kernels; CPU tensors run them only when they are interpreted, and the
reference otherwise (compiled kernels cannot read CPU memory).
"""

import contextlib
import contextvars
import os
import sys

import torch

_forced_reference = contextvars.ContextVar("tritonbn_forced_reference", default=False)
_interpreted: list[bool] = []  # decided once; a list so that the decision needs no global statement


def _env_asks_interpreter() -> bool:
    """TRITON_INTERPRET, read with the values Triton accepts."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _constant_under_compile(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo (seconds) at import: the mark
    it sets. torch.compile then bakes the answer into the graph it traces, as both answers here are fixed
    for the process or scoped to the caller."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def kernels_interpreted() -> bool:
    """Whether tritonbn's Triton kernels run under Triton's interpreter (fixed for the process)."""
    if not _interpreted:
        kernels = sys.modules.get("tritonbn.kernels")
        if kernels is None and _env_asks_interpreter():
            import tritonbn.kernels as kernels  # defining the kernels is what fixes the answer
        _interpreted.append(kernels.INTERPRETED if kernels is not None else False)
    return _interpreted[0]


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` runs the Triton kernels (else the PyTorch reference)."""
    return device_uses_kernels(x.device)


def device_uses_kernels(device: torch.device) -> bool:
    """Whether a call on tensors of ``device`` runs the Triton kernels."""
    kind = device.type
    if kind == "cuda":
        return True
    return kind == "cpu" and kernels_interpreted() and not _reference_forced()


@_constant_under_compile
def _reference_forced() -> bool:
    return _forced_reference.get()


@contextlib.contextmanager
def cpu_reference():
    """Run CPU tensors through the PyTorch reference even where the kernels are interpreted.

    The interpreter is exact but slow; a CPU training run (the impact study, say) uses this. The switch
    is a context variable, so it holds for this thread (or task) only.
    """
    token = _forced_reference.set(True)
    try:
        yield
    finally:
        _forced_reference.reset(token)
