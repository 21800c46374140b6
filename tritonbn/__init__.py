"""tritonbn: batch normalization fused with its activation (and a residual add) in Triton kernels.

Importing it is light: Triton is imported only when a kernel first runs.
"""

from .functional import batch_norm_act
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .validation import ACTIVATIONS

__all__ = ["ACTIVATIONS", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "batch_norm_act"]
__version__ = "0.1.0"
