"""`tritonbn-perf sync`: SyncBatchNormAct against nn.SyncBatchNorm + ReLU, per shape: what one training call
(forward + backward) does and, on GPUs, what it costs.

Every rank of a group of ``world_size`` processes (torch.multiprocessing.spawn: one per GPU over NCCL, or
gloo processes on a CPU) runs each way on its own batch of the shape, and rank 0 writes the rows:
- collectives per forward and per backward, counted as they are dispatched (c10d's ops, which nn.SyncBatchNorm
  calls, and the functional collectives tritonbn calls);
- host syncs per call: on CUDA the calls torch.cuda's sync debug mode reports; on a CPU the tensor values read
  on the host (``aten._local_scalar_dense``: ``.item()``, ``.tolist()``, ``int()``);
- on CUDA only, device time per call (CUDA events around many calls, divided) and host time per call (the
  wall time of issuing them, which includes any wait for the device that a host sync forces).
Both ways call their synchronized functions directly (tritonbn.sync.sync_batch_norm_act, and nn.SyncBatchNorm's
own autograd Function + ReLU), so a group of one (one GPU) synchronises too, where both modules would skip it.
On a CPU nn.SyncBatchNorm cannot run (its statistics ops have CUDA kernels only): its rows say so, and
tritonbn's carry counts but no times (the kernels are interpreted there, and no timing would mean speed).
"""

import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

COLUMNS = ("way", "shape", "dtype", "world_size", "backend", "device", "collectives_forward", "collectives_backward",
           "host_syncs", "device_ms", "host_ms", "note")
GPU_SHAPES = ((32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7))  # ResNet-50's per-GPU batch norms
CPU_SHAPES = ((2, 4, 4, 4),)


class Counting(TorchDispatchMode):
    """Collectives dispatched (c10d's ops and the functional collectives, waits aside) and host reads of tensor
    values, while active."""

    def __init__(self):
        super().__init__()
        self.collectives = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, op = func.name().partition("::")
        if namespace in ("c10d", "_c10d_functional") and "wait" not in op and not op.startswith("_wrap"):
            self.collectives += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        return func(*args, **(kwargs or {}))


def _ways(shape, dtype, device, group):
    """{way: a function of (x, dy) running one synchronized forward + backward}, each with its own state."""
    import tritonbn
    from tritonbn.sync import sync_batch_norm_act

    channels = shape[1]
    layer = tritonbn.SyncBatchNormAct(channels, device=device, dtype=dtype)
    torch_bn = torch.nn.SyncBatchNorm(channels, device=device, dtype=dtype)
    world_size = dist.get_world_size(group)

    def fused(x, dy):
        y = sync_batch_norm_act(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, 0.1,
                                activation="relu", process_group=group)
        return y, lambda: y.backward(dy)

    def torch_way(x, dy):
        from torch.nn.modules._functions import SyncBatchNorm

        y = F.relu(SyncBatchNorm.apply(x, torch_bn.weight, torch_bn.bias, torch_bn.running_mean,
                                       torch_bn.running_var, torch_bn.eps, 0.1, group, world_size))
        return y, lambda: y.backward(dy)

    return {"tritonbn": fused, "nn.SyncBatchNorm": torch_way}


def _counts(call, x, dy, device):
    """(collectives forward, collectives backward, host syncs per forward + backward)."""
    syncs = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Counting() as forward:
                _, backward_call = call(x, dy)
            with Counting() as backward:
                backward_call()
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    host_syncs = len(syncs) if device.type == "cuda" else forward.host_reads + backward.host_reads
    return forward.collectives, backward.collectives, host_syncs


def _times(call, x, dy, calls):
    """(device ms, host ms) per forward + backward on CUDA: events around ``calls`` calls, and the wall time of
    issuing them."""
    for _ in range(3):
        call(x, dy)[1]()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    began = time.perf_counter()
    for _ in range(calls):
        call(x, dy)[1]()
    host = (time.perf_counter() - began) * 1e3 / calls
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls, host


def measure_rank(rank, world_size, device_type, shapes, dtype, calls) -> list[dict]:
    """This rank's rows: every way on every shape."""
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    rows = []
    for shape in shapes:
        generator = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_()
        dy = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        for way, call in _ways(shape, dtype, device, group).items():
            row = dict.fromkeys(COLUMNS, "")
            row.update(way=way, shape="x".join(map(str, shape)), dtype=str(dtype).removeprefix("torch."),
                       world_size=world_size, backend=dist.get_backend(group), device=_device_name(device))
            if way == "nn.SyncBatchNorm" and device.type != "cuda":
                rows.append({**row, "note": "nn.SyncBatchNorm runs on CUDA only"})
                continue
            call(x, dy)[1]()  # first call: planning and compilation
            forward, backward, host_syncs = _counts(call, x, dy, device)
            row.update(collectives_forward=forward, collectives_backward=backward, host_syncs=host_syncs)
            if device.type == "cuda":
                times = [_times(call, x, dy, calls) for _ in range(5)]
                row.update(device_ms=round(statistics.median(t[0] for t in times), 4),
                           host_ms=round(statistics.median(t[1] for t in times), 4))
            rows.append(row)
    return rows


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from tritonbn import backend

    return "cpu (interpreted kernels)" if backend.kernels_interpreted() else "cpu (PyTorch reference)"


def _rank_main(rank, world_size, folder, device_type, shapes, dtype, calls):
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{os.path.join(folder, 'init')}", rank=rank,
                            world_size=world_size)
    try:
        rows = measure_rank(rank, world_size, device_type, shapes, dtype, calls)
        if rank == 0:
            torch.save(rows, os.path.join(folder, "rows.pt"))
    finally:
        dist.destroy_process_group()


def run(device: torch.device, shapes, dtype, world_size, calls) -> list[dict]:
    """The rows of a ``world_size``-process group (NCCL, a GPU each, on ``cuda``; gloo on a CPU), as rank 0
    measured them."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world_size, folder, device.type, shapes, dtype, calls), nprocs=world_size)
        return torch.load(os.path.join(folder, "rows.pt"))


def format_table(rows) -> str:
    shown = [column for column in COLUMNS if column not in ("dtype", "backend", "device")]
    return "\n".join([" | ".join(shown)] + [" | ".join(str(row[column]) for column in shown) for row in rows])
