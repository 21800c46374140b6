"""Training-step overhead: what share of a conv -> BN -> activation network's step BN+activation costs.

The network is a stack of ResNet basic blocks (conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> + skip -> ReLU) at
a realistic width. One step is forward, backward (from a fixed random output gradient, so no loss op
adds time) and an SGD update. Each backend's step is timed twice: as is, and with every BN+activation
(and the skip add that tritonbn fuses into it) replaced by the identity. The share is
(full - without) / full: the method is identity replacement, not a profiler, so it counts everything
the BN layers cost the step, launches and allocator traffic included.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .timing import measure, timing_label

BACKENDS = ("eager", "tritonbn", "compile")
METHOD = "identity-replacement"


class EagerBNAct(nn.Module):
    """nn.BatchNorm2d, then the skip add and ReLU in place, as torchvision's ResNet does."""

    def __init__(self, width: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x, residual=None):
        z = self.bn(x)
        if residual is not None:
            z += residual
        return torch.relu_(z)


class NoBNAct(nn.Module):
    """Stands in for BN+activation (and the skip add) to time the rest of the network."""

    def forward(self, x, residual=None):
        return x


class Block(nn.Module):
    def __init__(self, width: int, norm_act):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1, self.norm2 = norm_act(width), norm_act(width)

    def forward(self, x):
        return self.norm2(self.conv2(self.norm1(self.conv1(x))), residual=x)


def norm_act_factory(backend: str, with_bn: bool):
    if not with_bn:
        return lambda width: NoBNAct()
    if backend == "tritonbn":
        import tritonbn

        return lambda width: tritonbn.BatchNormAct2d(width, activation="relu")
    return EagerBNAct


def build(backend: str, with_bn: bool, width: int, blocks: int) -> nn.Module:
    model = nn.Sequential(*(Block(width, norm_act_factory(backend, with_bn)) for _ in range(blocks)))
    return torch.compile(model) if backend == "compile" else model


@dataclass(frozen=True)
class StepConfig:
    batch: int = 64
    width: int = 128
    size: int = 56
    blocks: int = 4
    dtype: str = "fp32"
    layout: str = "nchw"


# The interpreter runs kernels one program at a time, so a realistic network would take hours on a CPU:
# there the step defaults to a toy network, whose timings only show that the benchmark works.
CPU_STEP_CONFIG = StepConfig(batch=2, width=8, size=8, blocks=1)


def _autocast_dtype(name: str):
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def time_step(backend: str, with_bn: bool, cfg: StepConfig, device: torch.device, seed: int = 0) -> float:
    """Median milliseconds of one training step (forward, backward, SGD)."""
    torch.manual_seed(seed)
    fmt = torch.channels_last if cfg.layout == "nhwc" else torch.contiguous_format
    model = build(backend, with_bn, cfg.width, cfg.blocks).to(device=device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    shape = (cfg.batch, cfg.width, cfg.size, cfg.size)
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    cast = _autocast_dtype(cfg.dtype)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=cast, enabled=cast is not None):
            out = model(x)
        out.backward(dy.to(out.dtype))
        optimizer.step()

    median, _, _ = measure(step, device)
    return median


def run(cfg: StepConfig, backends, device: torch.device) -> list[dict]:
    rows = []
    for backend in backends:
        full = time_step(backend, True, cfg, device)
        without = time_step(backend, False, cfg, device)
        rows.append({
            "backend": backend, "batch": cfg.batch, "width": cfg.width, "size": cfg.size, "blocks": cfg.blocks,
            "bn_layers": 2 * cfg.blocks, "dtype": cfg.dtype, "layout": cfg.layout, "step_ms": full,
            "step_without_bn_act_ms": without, "bn_act_ms": full - without,
            "bn_act_share_pct": 100.0 * (full - without) / full, "method": METHOD,
            "timing": timing_label(device),
        })
    eager = next((r["step_ms"] for r in rows if r["backend"] == "eager"), math.nan)
    for row in rows:
        row["step_speedup_vs_eager"] = eager / row["step_ms"]
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'backend':<10}{'step ms':>12}{'no BN+act ms':>14}{'BN+act ms':>12}{'BN+act share':>14}" \
             f"{'vs eager':>10}"
    lines = [header]
    for r in rows:
        lines.append(f"{r['backend']:<10}{r['step_ms']:>12.4g}{r['step_without_bn_act_ms']:>14.4g}"
                     f"{r['bn_act_ms']:>12.4g}{r['bn_act_share_pct']:>13.1f}%{r['step_speedup_vs_eager']:>9.3g}x")
    lines.append(f"timing: {rows[0]['timing']}; share measured by {METHOD} (BN+act and the skip add removed)")
    return "\n".join(lines)
