"""Shape presets for the sweep: the BatchNorm layers of real networks, plus synthetic sets.

Every preset returns `ShapeCase`s: an input shape (N, C, *spatial) and how many layers of the network share
it, so a network with 53 BN layers is swept as its distinct shapes and nothing is timed twice.
"""

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeCase:
    shape: tuple[int, ...]
    layers: int = 1

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def reduced(self) -> int:
        """N·H·W (·D): the number of values each channel's statistics are taken over."""
        count = 1
        for i, size in enumerate(self.shape):
            if i != 1:
                count *= size
        return count

    @property
    def label(self) -> str:
        return "x".join(str(s) for s in self.shape)


def _dedup(shapes) -> list[ShapeCase]:
    """Collapse repeated shapes into one case each, keeping first-seen order."""
    counts = Counter(shapes)
    seen = dict.fromkeys(shapes)
    return [ShapeCase(shape, counts[shape]) for shape in seen]


def resnet50(batch: int) -> list[ShapeCase]:
    """torchvision's ResNet-50 (v1.5: stride on the 3x3 conv) at 224x224: 53 BN layers."""
    shapes = [(batch, 64, 112, 112)]  # stem
    size, width_in = 56, 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        out = planes * 4
        for block in range(blocks):
            first = block == 0
            size_out = size // stride if first else size
            shapes.append((batch, planes, size, size))  # bn1 after the 1x1 conv, before the stride
            shapes.append((batch, planes, size_out, size_out))  # bn2 after the strided 3x3 conv
            shapes.append((batch, out, size_out, size_out))  # bn3, followed by the residual add
            if first and (stride != 1 or width_in != out):
                shapes.append((batch, out, size_out, size_out))  # downsample branch
            size, width_in = size_out, out
    return _dedup(shapes)


def mobilenetv2(batch: int) -> list[ShapeCase]:
    """MobileNetV2 at 224x224: inverted residual blocks (expand, depthwise, project), 52 BN layers."""
    shapes = [(batch, 32, 112, 112)]
    size, width_in = 112, 32
    for expand, out, repeats, stride in (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
    ):
        for i in range(repeats):
            step = stride if i == 0 else 1
            hidden = width_in * expand
            if expand != 1:
                shapes.append((batch, hidden, size, size))
            size //= step
            shapes.append((batch, hidden, size, size))  # depthwise
            shapes.append((batch, out, size, size))  # projection
            width_in = out
    shapes.append((batch, 1280, size, size))  # final 1x1 conv
    return _dedup(shapes)


def resnet3d(batch: int) -> list[ShapeCase]:
    """R3D-18 on 16-frame 112x112 clips: 5-D (N, C, T, H, W) inputs, 20 BN layers."""
    shapes = [(batch, 64, 16, 56, 56)]  # stem, spatial stride 2
    size, frames, width_in = 56, 16, 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            if block == 0:
                size, frames = size // stride, frames // stride
            shapes.extend([(batch, planes, frames, size, size)] * 2)
            if block == 0 and planes != width_in:
                shapes.append((batch, planes, frames, size, size))  # downsample branch
        width_in = planes
    return _dedup(shapes)


def mlp(batch: int) -> list[ShapeCase]:
    """BatchNorm1d on (N, C) activations of MLP hidden layers."""
    return [ShapeCase((batch, width)) for width in (512, 1024, 2048, 4096)]


def scaling(channels: int = 16) -> list[ShapeCase]:
    """One channel count, N·H·W = 1K, 4K, ... 64M (32x32 images, N grows), to show how cost grows.

    16 channels keep the largest case at 4 GiB per fp32 tensor, so fwd+bwd fits an 80 GB GPU with room
    for every backend's temporaries.
    """
    return [ShapeCase((4**k, channels, 32, 32)) for k in range(9)]


def tiny() -> list[ShapeCase]:
    """Small 2-D, 4-D and 5-D cases that run in seconds under the Triton interpreter."""
    return [ShapeCase((2, 4, 3, 5)), ShapeCase((6, 8)), ShapeCase((2, 3, 2, 2, 3))]


# Network presets: name -> (its BN shapes at a batch size, the batch used when --batch is not given: the size
# the network is usually trained at).
NETWORK_PRESETS = {"resnet50": (resnet50, 64), "mobilenetv2": (mobilenetv2, 64), "resnet3d": (resnet3d, 8),
                   "mlp": (mlp, 4096)}
# Synthetic presets: fixed shapes, which --batch does not change.
SYNTHETIC_PRESETS = {"scaling": scaling, "tiny": tiny}
PRESETS = (*NETWORK_PRESETS, *SYNTHETIC_PRESETS)


def preset_shapes(name: str, batch: int | None = None) -> list[ShapeCase]:
    """The shape cases of a preset; `batch` overrides the preset's default batch where it has one."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if name in SYNTHETIC_PRESETS:
        return SYNTHETIC_PRESETS[name]()
    builder, default_batch = NETWORK_PRESETS[name]
    return builder(batch if batch is not None else default_batch)
