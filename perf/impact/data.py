"""The impact study's data: scikit-learn's 1797 bundled 8x8 handwritten digits (no download), split once
into a training and a test set, and the shuffled mini-batches a run trains on."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class DigitSplit:
    x_train: torch.Tensor  # (N, 1, 8, 8), standardised with the training set's mean and std
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digit_split(device: torch.device | str, split_seed: int = 0, test_fraction: float = 0.25) -> DigitSplit:
    """The 1797 bundled 8x8 digits, split once by `split_seed` (independent of the training seeds)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_test = round(len(labels) * test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    pixels = torch.tensor((images - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
    targets = torch.tensor(labels, dtype=torch.long)
    return DigitSplit(pixels[train_idx].to(device), targets[train_idx].to(device),
                      pixels[test_idx].to(device), targets[test_idx].to(device))


def shuffled_batches(n: int, batch_size: int, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batch indices, the same sequence for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]
