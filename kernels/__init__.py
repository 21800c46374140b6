"""Triton kernels for fused batch norm + activation, and the plans that launch them.

Kernels know nothing about autograd or modules: ``tritonbn.functional`` builds on the plans.
  forward.py   the forward kernel (moments, normalise + residual + activation) and its plan
  backward.py  the backward kernel (gradient sums, input gradient) and its plan
  tiles.py     jit helpers both directions share: addressing per layout, partials, ticket, grid barrier
  plan.py      layouts, tiling and counters, computed once per specialization
  configs.py   configurations as data: the tuning table and the heuristic behind it
  launch.py    compiled kernels launched directly, without Triton's per-call binding
  grouped.py   the same kernels in pieces, for synchronized batch norm
"""

import triton.language.standard as _triton_library

from .forward import ForwardPlan, forward_kernel
from .plan import output_layout

# Triton decides at definition whether a jit function is interpreted (TRITON_INTERPRET=1) or compiled: its own
# library when triton is imported, these kernels when tritonbn.kernels is. Interpreted kernels that call a
# compiled library fail, so they count as interpreted only when both are.
INTERPRETED = all(type(fn).__name__ == "InterpretedFunction" for fn in (forward_kernel, _triton_library.sum))

__all__ = ["INTERPRETED", "ForwardPlan", "output_layout"]
