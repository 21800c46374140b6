"""The impact study's nets: a small CNN and an MLP for the 8x8 digits, each in one of four arms: with
tritonbn's fused BN + ReLU (`bn`), without BN (`plain`), without BN but with dropout (`dropout`), and with
tritonbn's BN followed by injected noise, then ReLU (`noisy`, claim 5's intervention; see `noise`)."""

from __future__ import annotations

import torch
from torch import nn

from .data import NUM_CLASSES
from .noise import PAPER_NOISE, BatchNormNoise, NoiseModel

MODEL_KINDS = ("cnn", "mlp")
ARMS = ("bn", "plain", "dropout", "noisy")
# The arms every claim compares; the dropout arm only stands beside them for reference (claim 2).
COMPARED_ARMS = ("bn", "plain")
# The arms of claim 5's intervention, all trained at the baseline settings with ICS and the loss landscape.
INTERVENTION_ARMS = ("bn", "plain", "noisy")
ARM_LABELS = {"bn": "tritonbn BN", "plain": "no BN", "dropout": "no BN + dropout", "noisy": "BN + injected noise"}
CNN_WIDTHS = (8, 16, 16)
MLP_WIDTHS = (128, 128, 128)


def _block(kind: str, arm: str, fan_in: int, fan_out: int, dropout: float, noise: NoiseModel) -> list[nn.Module]:
    """One hidden layer: weight layer, then fused BN+ReLU (bn), BN + noise + ReLU (noisy) or bias + ReLU
    (plain, dropout). The noise goes between BN and ReLU because the paper perturbs the batch-normalized
    activation (its VGG applies ReLU after BN), so the noisy arm's BN runs tritonbn's identity activation."""
    import tritonbn

    conv = kind == "cnn"
    normalized = arm in ("bn", "noisy")
    weight_layer = (nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=not normalized) if conv
                    else nn.Linear(fan_in, fan_out, bias=not normalized))
    norm = tritonbn.BatchNormAct2d if conv else tritonbn.BatchNormAct1d
    if arm == "bn":
        return [weight_layer, norm(fan_out, activation="relu")]
    if arm == "noisy":  # the noise's seed comes from the global RNG, so a run's seed fixes its noise too
        injected = BatchNormNoise(int(torch.randint(2**62, ())), noise)
        return [weight_layer, norm(fan_out, activation="identity"), injected, nn.ReLU()]
    layers = [weight_layer, nn.ReLU()]
    if arm == "dropout":
        layers.append(nn.Dropout(dropout))
    return layers


def build_model(kind: str, arm: str, dropout: float = 0.2, noise: NoiseModel = PAPER_NOISE) -> nn.Sequential:
    """The CNN (8x8 -> 3x3 conv 8 -> conv 16 -> pool -> conv 16 -> pool -> linear) or the MLP (64 -> 3x128 ->
    linear), in one of the ARMS; parameters (and the noisy arm's noise seeds) come from the global torch RNG."""
    if arm not in ARMS or kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {kind!r} / arm {arm!r}")
    if kind == "cnn":
        c1, c2, c3 = CNN_WIDTHS
        layers = [*_block(kind, arm, 1, c1, dropout, noise), *_block(kind, arm, c1, c2, dropout, noise),
                  nn.MaxPool2d(2), *_block(kind, arm, c2, c3, dropout, noise), nn.MaxPool2d(2), nn.Flatten(),
                  nn.Linear(c3 * 2 * 2, NUM_CLASSES)]
    else:
        widths = (64, *MLP_WIDTHS)
        layers = [nn.Flatten()]
        for fan_in, fan_out in zip(widths, widths[1:]):
            layers += _block(kind, arm, fan_in, fan_out, dropout, noise)
        layers.append(nn.Linear(widths[-1], NUM_CLASSES))
    return nn.Sequential(*layers)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def scale_init(model: nn.Module, scale: float) -> None:
    """Multiply every conv/linear weight (not biases, not BN's gamma) by `scale`."""
    with torch.no_grad():
        for _, layer in weight_layers(model):
            layer.weight.mul_(scale)
