"""A small conv net as users convert it for multi-GPU training, and its training under DistributedDataParallel
(or in one process on the whole batch, the yardstick).

Four batch norms, each followed by an activation: nn.BatchNorm2d + ReLU, one with momentum=None and a residual
add before its ReLU, and two of timm's BatchNormAct2d (tests/conversion/timm_standin.py). One of those is first
converted the way timm's convert_sync_batchnorm converts it, into timm's SyncBatchNormAct, whose activation
nn.SyncBatchNorm.convert_sync_batchnorm would lose (huggingface/pytorch-image-models#1254). tritonbn.fuse then
convert_sync_batchnorm must give four SyncBatchNormAct, each keeping its activation.
"""

import torch
import torch.nn.functional as F
from conversion.timm_standin import BatchNormAct2d, sync_from
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import tritonbn

STEPS = 3
LEARNING_RATE = 0.1
IMAGE = (3, 4, 4)
FUSED = {"bn1": ("relu", 0.01), "bn2": ("relu", 0.01), "norm3": ("silu", 0.01), "norm4": ("leaky_relu", 0.2)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)
        self.conv3 = nn.Conv2d(4, 4, 1, bias=False)
        self.norm3 = BatchNormAct2d(4, act_layer=nn.SiLU)
        self.conv4 = nn.Conv2d(4, 4, 1, bias=False)
        self.norm4 = BatchNormAct2d(4, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2})
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + out)
        out = self.norm4(self.conv4(self.norm3(self.conv3(out))))
        return self.head(out.mean((2, 3)))


def make_net(seed: int) -> Net:
    """The net in float64, with the same random weights and batch norm state for the same seed."""
    torch.manual_seed(seed)
    net = Net().double()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
    return net


def sync_net(net: Net) -> nn.Module:
    """``net`` converted for synchronized training: timm's conversion of norm4, tritonbn.fuse, then
    tritonbn.convert_sync_batchnorm."""
    net.norm4 = sync_from(net.norm4)
    return tritonbn.convert_sync_batchnorm(tritonbn.fuse(net))


def net_batches(seed: int, batch_sizes, rank: int):
    """(input, target) of each step: rank ``rank``'s share of batches of sum(batch_sizes) samples."""
    generator = torch.Generator().manual_seed(seed + 1)
    start, total = sum(batch_sizes[:rank]), sum(batch_sizes)
    batches = [(torch.randn(total, *IMAGE, generator=generator, dtype=torch.float64) * 2 + 1,
                torch.randn(total, 2, generator=generator, dtype=torch.float64)) for _ in range(STEPS)]
    return [(x[start : start + batch_sizes[rank]], target[start : start + batch_sizes[rank]]) for x, target in batches]


def train(seed: int, batch_sizes, rank: int, world_size: int, distributed: bool = True) -> dict:
    """STEPS of SGD on the sum of squared errors over the whole batch divided by its size: under DDP each rank's
    share of that loss, scaled by the world size, since DDP averages the ranks' gradients. Returns each step's
    loss share, the final weights and running statistics, and the fused layers' (activation, slope)."""
    net = make_net(seed)
    if distributed:
        net = sync_net(net)
        fused = {name: (m.activation, m.negative_slope) for name, m in net.named_modules()
                 if isinstance(m, tritonbn.SyncBatchNormAct)}
        model = DistributedDataParallel(net)
    else:
        fused, model = FUSED, net
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
    losses = []
    for x, target in net_batches(seed, batch_sizes, rank):
        optimizer.zero_grad()
        loss = (model(x) - target).square().sum() / sum(batch_sizes)
        (loss * world_size).backward()
        optimizer.step()
        losses.append(loss.detach())
    state = {name.removeprefix("module."): value.clone() for name, value in net.state_dict().items()}
    return {"losses": losses, "state": state, "fused": fused}
