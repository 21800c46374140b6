"""The minimum-bytes model that turns a time into effective bandwidth, and the copy-bandwidth ceiling.

Minimum traffic per mode, in passes over one activation tensor (x.numel() * itemsize bytes):

- fwd (training) = read x + write y = 2; a residual adds a read of it (3). Reading x once assumes a
  channel's slice stays on chip between the statistics and the normalization: the ideal, not a given.
- eval = read x + write y = 2 (+1 read with a residual).
- bwd = read dy, x + write dx = 3. With a residual, dresidual is written (+1), and the activation's input
  z = bn(x) + residual must be rebuilt to take act'(z), so the residual is read too (+1), unless the
  activation is the identity, whose derivative does not depend on z.
- fwd_bwd = fwd + bwd.

The floor is the least traffic any kernel can move for a tensor larger than the L2 cache: statistics must be
complete before any output is written, so x is read twice forward and dy and x twice backward.

- fwd = read x twice + write y = 3 (+1 read with a residual); eval = 2 (+1).
- bwd = read dy, x twice + write dx = 5; a residual adds the write of its gradient (+1) and, unless the
  activation is the identity, two reads of it to rebuild z (+2).
- fwd_bwd = 8 without a residual.

Per-channel parameters, statistics and their gradients are C-sized and left out as negligible.
Effective bandwidth = minimum bytes / time; it is compared with a device-to-device copy measured in the
same run (read + write of a large buffer), the practical ceiling for a memory-bound kernel.
"""

import torch


def min_passes(mode: str, residual: bool, activation: str = "relu") -> int:
    fwd = 2 + int(residual)
    bwd = 3 + (2 if residual and activation != "identity" else int(residual))
    return {"fwd": fwd, "eval": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def floor_passes(mode: str, residual: bool, activation: str = "relu") -> int:
    fwd = 3 + int(residual)
    bwd = 5 + (3 if residual and activation != "identity" else int(residual))
    return {"fwd": fwd, "eval": 2 + int(residual), "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def min_bytes(mode: str, numel: int, itemsize: int, residual: bool, activation: str = "relu") -> int:
    return min_passes(mode, residual, activation) * numel * itemsize


def effective_gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written over time)."""
    from .timing import measure

    if nbytes is None:
        # 1 GiB on a GPU is far past any L2; a CPU copy only needs to be past the caches.
        nbytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median, _, _ = measure(lambda: dst.copy_(src), device, cpu_runs=5)
    return effective_gbps(2 * nbytes, median)
