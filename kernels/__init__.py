"""Triton kernels for fused batch norm + activation, and the plans that launch them.

Kernels know nothing about autograd or modules: ``tritonbn.functional`` builds on the plans.
  forward.py   moments partials and normalise + residual + activation (training 2 launches, eval 1)
  backward.py  gradient-sum partials and the input gradient (2 launches)
  tiles.py     jit helpers both directions share
  plan.py      tiling and layouts, computed once per specialization
  launch.py    compiled kernels launched directly, without Triton's per-call binding
  grouped.py   the same kernels in pieces, for synchronized batch norm
"""

from .activations import ACTIVATION_IDS
from .backward import backward_plan
from .forward import ForwardPlan, moments_partial_kernel
from .plan import output_layout

# Triton decides at definition whether a kernel is interpreted (TRITON_INTERPRET=1) or compiled.
INTERPRETED = type(moments_partial_kernel).__name__ == "InterpretedFunction"

__all__ = ["ACTIVATION_IDS", "INTERPRETED", "ForwardPlan", "backward_plan", "output_layout"]
