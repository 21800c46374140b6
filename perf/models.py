"""The networks `step` trains, and the same networks with batch norm and its activation taken out.

`resnet50` is torchvision's ResNet-50 where torchvision is importable (it is not a dependency), else the
same architecture defined here: torchvision's v1.5 bottleneck (stride on the 3x3 conv), with the skip add
and ReLU written as torchvision writes them, so that `tritonbn.fuse` finds the same patterns in both.
`toy` is that architecture shrunk to seconds per step under the Triton interpreter.
"""

from dataclasses import dataclass

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """Stem (7x7 conv, BN, ReLU, max-pool), bottleneck stages doubling the width, pooling, classifier."""

    def __init__(self, blocks=(3, 4, 6, 3), width: int = 64, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, inplanes = [], width
        for i, count in enumerate(blocks):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.avgpool(self.stages(x)).flatten(1))


@dataclass(frozen=True)
class Network:
    name: str
    blocks: tuple[int, ...]
    width: int
    classes: int
    image: int  # input height and width


NETWORKS = {
    "resnet50": Network("resnet50", (3, 4, 6, 3), 64, 1000, 224),
    # One block, narrow: the interpreter's time grows with the channels of every fused layer.
    "toy": Network("toy", (1,), 2, 10, 16),
}


def build(network: Network) -> tuple[nn.Module, str]:
    """The model and what it is: torchvision's ResNet-50 when importable, else this module's."""
    if network.name == "resnet50":
        try:
            import torchvision
        except Exception:  # absent or broken: the architecture defined here stands in
            pass
        else:
            return torchvision.models.resnet50(), "torchvision resnet50"
    return ResNet(network.blocks, network.width, network.classes), f"{network.name} (tritonbn.perf.models)"


def batch_norm_layers(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def without_bn_act(model: nn.Module) -> nn.Module:
    """`model` with every batch norm and ReLU replaced by nn.Identity (in place); the skip adds stay."""
    for name, child in model.named_children():
        if isinstance(child, (_BatchNorm, nn.ReLU)):
            setattr(model, name, nn.Identity())
        else:
            without_bn_act(child)
    return model
