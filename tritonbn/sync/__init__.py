"""Synchronized batch norm + activation over a torch.distributed process group: ``SyncBatchNormAct``.

Each direction is two pieces with one collective between them, and no host sync anywhere:
- forward: this rank's per-channel (count, mean, M2), one all_gather, then one call that merges the ranks'
  statistics, updates the running statistics and normalises + adds + activates;
- backward: this rank's sums of dz and dz * xhat, one all_reduce, then the input gradient.
The group's count, mean and variance never leave the device, so uneven and empty ranks need no host decision,
torch.compile(fullgraph=True) traces a step whole (functional collectives) and a CUDA graph can capture it.

  module.py     SyncBatchNormAct and convert_sync_batchnorm
  function.py   sync_batch_norm_act: the autograd Function, its collectives and which pieces run
  reference.py  the pieces in PyTorch ops (CPU tensors without the interpreter, cpu_reference())
  ops.py        the kernels' pieces as custom ops for torch.compile (triton_ops.py: as triton ops on a GPU)
The kernels' pieces are tritonbn.kernels.grouped.
"""

from .function import sync_batch_norm_act
from .module import SyncBatchNormAct, convert_sync_batchnorm

__all__ = ["SyncBatchNormAct", "convert_sync_batchnorm", "sync_batch_norm_act"]
