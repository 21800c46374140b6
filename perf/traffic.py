"""Memory-traffic audit: the bytes every Triton launch loads and stores, counted under the interpreter.

Under TRITON_INTERPRET=1 every global load and store of a kernel goes through the interpreter's builder
(`create_masked_load` / `create_masked_store`; plain, atomic and descriptor loads and stores are routed
through them) and every launch through `GridExecutor.__call__`. `count_traffic()` wraps those, counting
the bytes of the lanes whose mask is true, so the numbers are exact, deterministic and need no GPU. It is
the project's GPU-independent performance guard: a kernel that starts reading its input one more time
shows up here as one more pass.

Traffic is reported in passes over one activation tensor: (bytes loaded + bytes stored) / x.nbytes.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from tritonbn import backend

from .bandwidth import min_passes
from .constants import MODES

# Passes the current kernels may make (without / with a residual). Raising one is a deliberate decision.
BUDGET = {"fwd": (3, 4), "bwd": (5, 7), "eval": (2, 3)}
# Per-channel parameters, statistics and partial sums are counted too; they stay far below this fraction
# of a pass on the audit's shapes, while a whole extra pass of the activation tensor does not.
PER_CHANNEL_SLACK = 0.1
# fwd_bwd's traffic is fwd's plus bwd's: it has no launches of its own to count.
AUDIT_MODES = tuple(mode for mode in MODES if mode != "fwd_bwd")


@dataclass
class KernelTraffic:
    launches: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0


@dataclass
class Traffic:
    """What the Triton launches inside one `count_traffic()` block read and wrote."""

    bytes_loaded: int = 0
    bytes_stored: int = 0
    launches: int = 0
    kernels: dict[str, KernelTraffic] = field(default_factory=dict)

    def passes(self, nbytes: int) -> float:
        """Bytes moved, in passes over a tensor of `nbytes` bytes."""
        return (self.bytes_loaded + self.bytes_stored) / nbytes

    def _kernel(self, name: str) -> KernelTraffic:
        return self.kernels.setdefault(name, KernelTraffic())

    def _load(self, kernel: str, nbytes: int) -> None:
        self.bytes_loaded += nbytes
        self._kernel(kernel).bytes_loaded += nbytes

    def _store(self, kernel: str, nbytes: int) -> None:
        self.bytes_stored += nbytes
        self._kernel(kernel).bytes_stored += nbytes

    def _launch(self, kernel: str) -> None:
        self.launches += 1
        self._kernel(kernel).launches += 1


def _lane_bytes(ptrs, mask) -> int:
    """Bytes touched by an access: element size times the lanes whose mask is true."""
    itemsize = (ptrs.get_element_ty().primitive_bitwidth + 7) // 8
    if mask is None:
        return itemsize * int(np.size(ptrs.data))
    return itemsize * int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))


@contextmanager
def count_traffic():
    """Count the global-memory traffic and launches of the Triton kernels run inside the block.

    Usage: `with count_traffic() as t: ...; t.bytes_loaded, t.bytes_stored, t.launches, t.kernels`.
    Atomic read-modify-writes count as one load and one store of each active lane.
    """
    if not backend.kernels_interpreted():
        raise RuntimeError("count_traffic() needs tritonbn's kernels under the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before tritonbn.kernels is imported")
    from triton.runtime import interpreter

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    originals = {
        (builder, "create_masked_load"): builder.create_masked_load,
        (builder, "create_masked_store"): builder.create_masked_store,
        (builder, "create_atomic_rmw"): builder.create_atomic_rmw,
        (builder, "create_atomic_cas"): builder.create_atomic_cas,
        (executor, "__call__"): executor.__call__,
    }
    traffic = Traffic()
    running = ["<no launch>"]  # name of the kernel whose program is being interpreted

    def masked_load(self, ptrs, mask, *args, **kwargs):
        traffic._load(running[0], _lane_bytes(ptrs, mask))
        return originals[builder, "create_masked_load"](self, ptrs, mask, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        traffic._store(running[0], _lane_bytes(ptrs, mask))
        return originals[builder, "create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        nbytes = _lane_bytes(ptr, mask)
        traffic._load(running[0], nbytes)
        traffic._store(running[0], nbytes)
        return originals[builder, "create_atomic_rmw"](self, op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(self, ptr, *args, **kwargs):
        nbytes = _lane_bytes(ptr, None)
        traffic._load(running[0], nbytes)
        traffic._store(running[0], nbytes)
        return originals[builder, "create_atomic_cas"](self, ptr, *args, **kwargs)

    def launch(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", "<kernel>")
        traffic._launch(name)
        outer, running[0] = running[0], name
        try:
            return originals[executor, "__call__"](self, *args, **kwargs)
        finally:
            running[0] = outer

    wrappers = {
        (builder, "create_masked_load"): masked_load,
        (builder, "create_masked_store"): masked_store,
        (builder, "create_atomic_rmw"): atomic_rmw,
        (builder, "create_atomic_cas"): atomic_cas,
        (executor, "__call__"): launch,
    }
    for (owner, name), wrapper in wrappers.items():
        setattr(owner, name, wrapper)
    try:
        yield traffic
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def eager_passes(mode: str, residual: bool, activation: str) -> int:
    """Passes of eager PyTorch (cuDNN BN, then the add, then the activation), one op at a time.

    BN reads x for the statistics, then reads x and writes y (3; 2 in eval); its backward reads dz and x
    to reduce, then dz and x again to write dx (5). The add reads two tensors and writes one (3); its
    backward hands the same gradient to both inputs (0). An activation reads and writes (2); its backward
    reads dy and the saved tensor and writes the gradient (3); the identity costs nothing.
    """
    act = activation != "identity"
    add = 3 * int(residual)
    return {"fwd": 3 + add + 2 * act, "eval": 2 + add + 2 * act, "bwd": 5 + 3 * act}[mode]


def budget(mode: str, residual: bool) -> int:
    return BUDGET[mode][int(residual)]


def audit(shape=(8, 4, 32, 32), dtype=torch.float32, activation="relu", layout="nchw", seed=0) -> list[dict]:
    """One row per (mode, residual): tritonbn's measured passes next to the minimum, budget and eager."""
    import tritonbn

    from .sweep import memory_format

    generator = torch.Generator().manual_seed(seed)
    fmt = memory_format(layout, len(shape))
    channels = shape[1]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def activation_tensor():
        return torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=fmt)

    rows = []
    for residual in (False, True):
        x = activation_tensor().requires_grad_()
        weight = (torch.rand(channels, generator=generator, dtype=param_dtype) + 0.5).requires_grad_()
        bias = torch.randn(channels, generator=generator, dtype=param_dtype).requires_grad_()
        res = activation_tensor().requires_grad_() if residual else None
        dy = activation_tensor()
        stats = (torch.zeros(channels, dtype=param_dtype), torch.ones(channels, dtype=param_dtype))

        def call(training, x=x, weight=weight, bias=bias, res=res, stats=stats):
            return tritonbn.batch_norm_act(x, *stats, weight, bias, training=training, activation=activation,
                                           residual=res)

        counts = {}
        with count_traffic() as counts["fwd"]:
            y = call(True)
        leaves = [t for t in (x, weight, bias, res) if t is not None]
        with count_traffic() as counts["bwd"]:
            torch.autograd.grad(y, leaves, dy)
        with torch.no_grad(), count_traffic() as counts["eval"]:
            call(False)
        for mode in AUDIT_MODES:
            rows.append(_audit_row(mode, residual, activation, counts[mode], x, layout))
    return rows


def _audit_row(mode, residual, activation, traffic: Traffic, x: torch.Tensor, layout: str) -> dict:
    if traffic.launches == 0:
        raise RuntimeError(f"no Triton launch in {mode}: tritonbn did not run its kernels under the interpreter")
    nbytes = x.numel() * x.element_size()
    passes = traffic.passes(nbytes)
    limit = budget(mode, residual)
    return {
        "mode": mode, "residual": residual, "shape": "x".join(map(str, x.shape)), "dtype": str(x.dtype)[6:],
        "layout": layout, "activation": activation, "bytes_loaded": traffic.bytes_loaded,
        "bytes_stored": traffic.bytes_stored, "launches": traffic.launches, "passes": round(passes, 3),
        "minimum": min_passes(mode, residual, activation), "budget": limit,
        "eager": eager_passes(mode, residual, activation),
        "within_budget": passes <= limit + PER_CHANNEL_SLACK,
        "kernels": " ".join(f"{name}x{k.launches}" for name, k in traffic.kernels.items() if k.launches),
    }


TABLE_COLUMNS = ("mode", "residual", "passes", "minimum", "budget", "eager", "launches", "within_budget",
                 "kernels")


def format_table(rows: list[dict]) -> str:
    cells = [[str(row[c]) for c in TABLE_COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)

