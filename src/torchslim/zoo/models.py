"""Reference models: LeNet-300-100, LeNet-5, a residual 1-D CNN with BatchNorm, a plain MLP.

Every builder takes ``in_shape`` (per-sample input shape) and ``num_classes`` so that the same
name works on digits (64 features = 8x8 images) and MNIST-1D (40-sample signals).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def lenet300(in_shape: tuple[int, ...] = (64,), num_classes: int = 10) -> MLP:
    """LeNet-300-100 (LeCun et al. 1998): two hidden layers of 300 and 100 units."""
    return MLP(_numel(in_shape), (300, 100), num_classes)


def mlp(in_shape: tuple[int, ...] = (64,), num_classes: int = 10, hidden: tuple[int, ...] = (128,)) -> MLP:
    return MLP(_numel(in_shape), tuple(hidden), num_classes)


class LeNet5(nn.Module):
    """LeNet-5 for square single-channel images given flat or as (1, H, W).

    28x28 gives the classic 5x5-conv layout; small inputs (8x8 digits) use padded 3x3 convs so
    that two 2x pools still leave a 2x2 map.
    """

    def __init__(self, side: int, num_classes: int = 10):
        super().__init__()
        self.side = side
        k, pad = (5, 2) if side >= 16 else (3, 1)
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, k, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, k, padding=0 if side >= 16 else pad), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, side, side)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        return self.classifier(self.features(x))


def lenet5(in_shape: tuple[int, ...] = (64,), num_classes: int = 10) -> LeNet5:
    side = math.isqrt(_numel(in_shape))
    if side * side != _numel(in_shape):
        raise ValueError(f"lenet5 needs square single-channel images, got input shape {in_shape}")
    return LeNet5(side, num_classes)


class ResBlock1d(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity (or a strided 1x1 conv+BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResCNN1d(nn.Module):
    """Small residual CNN with BatchNorm for 1-D signals (e.g. MNIST-1D, length 40)."""

    def __init__(self, length: int, num_classes: int = 10, width: int = 64, blocks: int = 2):
        super().__init__()
        self.length = length
        self.stem = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU()
        )
        layers = []
        for i in range(blocks):
            layers.append(ResBlock1d(width, width, stride=1))
            layers.append(ResBlock1d(width, width, stride=2 if i == 0 else 1))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.length)
        x = self.layers(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def rescnn1d(in_shape: tuple[int, ...] = (40,), num_classes: int = 10, width: int = 64, blocks: int = 2) -> ResCNN1d:
    return ResCNN1d(_numel(in_shape), num_classes, width=width, blocks=blocks)
