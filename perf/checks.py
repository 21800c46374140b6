"""Is a backend's result right? Every output is compared with a float64 reference of the same inputs.

The reference is eager PyTorch in float64 on the very values the backend saw (already rounded to its
dtype), so what is left is the backend's own rounding, and mask flips: where the exact pre-activation z
lies within rounding of a kink of the activation (ReLU's 0), float32 and float64 can take different
sides. A flip changes one element of the activation's gradient completely and, through the batch sums,
that channel's dweight and dbias; the sweep once called 64x2048x7x7 bf16 backward a mismatch (max-abs
0.044 against eager) for one flip at |z| ~ 0. The rules below tolerate that and nothing bigger:

- Every element must lie within ELEMENT_TOL[dtype] * (|ref| + rms(ref)) of the reference. In dx and
  dresidual, a few isolated elements may not: at most 1 + OUTLIER_FRACTION * numel in all, and at most
  OUTLIERS_PER_CHANNEL in one channel. A wrong scale, shift or statistic moves a whole channel instead.
- dweight and dbias may be off only in channels where dx holds such a tolerated outlier.
- y and the running statistics may not be off anywhere: every activation is continuous, so a flip
  barely moves y, and the statistics do not depend on the activation at all.
- With the tolerated outliers set aside, the relative L2 error of y, dx and dresidual must stay below
  REL_L2[dtype]: that catches an error spread thinly over everything.
"""

import math
from dataclasses import dataclass

import torch

# Rounding of the output dtype, with room: float32 outputs come from float32 sums over up to ~1e8 values
# (and a flip moves a channel's dx by ~1/N*H*W), bf16 rounds at ~4e-3, fp16 at ~5e-4.
ELEMENT_TOL = {"fp64": 1e-8, "fp32": 1e-3, "fp16": 1e-2, "bf16": 4e-2}
REL_L2 = {"fp64": 1e-10, "fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2}
OUTLIER_FRACTION = 1e-5
OUTLIERS_PER_CHANNEL = 2
ACTIVATION_GRADIENTS = ("dx", "dresidual")
CHANNEL_GRADIENTS = ("dweight", "dbias")
ACTIVATION_SIZED = ("y",) + ACTIVATION_GRADIENTS


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rel_l2: float  # worst relative L2 error of y, dx, dresidual, tolerated outliers set aside
    outliers: int  # tolerated outliers, over all outputs
    problem: str = ""  # the first rule broken, for the status column


def _per_channel(mask: torch.Tensor) -> torch.Tensor:
    """Count of true elements per channel (dimension 1) of an activation-sized mask."""
    return mask.transpose(0, 1).reshape(mask.shape[1], -1).sum(dim=1)


def compare(outputs: dict, reference: dict, dtype: str) -> Verdict:
    """Check every reference output against the backend's; the rules are in the module's docstring."""
    worst_l2, tolerated_total, problems = 0.0, 0, []
    flip_channels = None  # channels of dx (or dresidual) holding a tolerated outlier
    # The activation's gradients first: they say which channels a flip may have moved.
    for name in sorted(reference, key=lambda n: n not in ACTIVATION_GRADIENTS):
        ref = reference[name].detach().double()
        got = outputs.get(name)
        if got is None or got.shape != ref.shape:
            problems.append(f"{name}: shape {None if got is None else tuple(got.shape)}, expected {tuple(ref.shape)}")
            continue
        got = got.detach().double()
        if not torch.isfinite(got).all() and torch.isfinite(ref).all():
            problems.append(f"{name}: not finite")
            continue
        err = (got - ref).abs()
        rms = ref.square().mean().sqrt() if ref.numel() else ref.new_zeros(())
        outlier = ~(err <= ELEMENT_TOL[dtype] * (ref.abs() + rms))
        tolerated = torch.zeros_like(outlier)
        if name in ACTIVATION_GRADIENTS:
            count, allowed = int(outlier.sum()), 1 + int(OUTLIER_FRACTION * ref.numel())
            crowded = int(_per_channel(outlier).max()) if ref.numel() else 0
            if count > allowed or crowded > OUTLIERS_PER_CHANNEL:
                problems.append(f"{name}: {count} elements off (at most {allowed} isolated ones allowed), "
                                f"up to {crowded} in one channel")
            else:
                tolerated = outlier
                channels = _per_channel(outlier) > 0
                flip_channels = channels if flip_channels is None else flip_channels | channels
        elif name in CHANNEL_GRADIENTS and flip_channels is not None:
            tolerated = outlier & flip_channels
        untolerated = int((outlier & ~tolerated).sum())
        if untolerated:
            problems.append(f"{name}: {untolerated} of {ref.numel()} elements off")
        tolerated_total += int(tolerated.sum())
        if name in ACTIVATION_SIZED:
            rel = (err.masked_fill(tolerated, 0).norm() / ref.norm().clamp_min(1e-300)).item()
            worst_l2 = max(worst_l2, rel) if math.isfinite(rel) else math.inf
            if not rel <= REL_L2[dtype]:
                problems.append(f"{name}: relative L2 error {rel:.2g} > {REL_L2[dtype]:g}")
    return Verdict(not problems, worst_l2, tolerated_total, problems[0] if problems else "")
