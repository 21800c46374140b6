"""tritonbn: batch normalization fused with its activation (and a residual add) in Triton kernels.

Importing it is light: Triton is imported only when a kernel first runs.
"""

from .backend import cpu_reference, uses_kernels
from .conversion import FuseReport, fuse, unfuse
from .functional import batch_norm_act
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNormAct, convert_sync_batchnorm
from .validation import ACTIVATIONS

__all__ = [
    "ACTIVATIONS",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "FuseReport",
    "SyncBatchNormAct",
    "batch_norm_act",
    "convert_sync_batchnorm",
    "cpu_reference",
    "fuse",
    "unfuse",
    "uses_kernels",
]
__version__ = "0.1.0"
