"""Small models for seconds-long demos and tests: LeNet-5, an MLP and a tiny residual CNN."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from easier.models._common import init_conv_bn, require, scaled
from easier.models._registry import register_model


class LeNet5(nn.Module):
    """conv5x5(6)-ReLU-pool-conv5x5(16)-ReLU-pool-fc120-ReLU-fc84-ReLU-fc: 4 ReLU sites."""

    def __init__(self, num_classes: int, in_channels: int, width: float, image_size: int) -> None:
        super().__init__()
        c1, c2, f1, f2 = (scaled(c, width) for c in (6, 16, 120, 84))
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, each followed by a 2x2 pool
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.relu1 = nn.ReLU(inplace=False)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.relu2 = nn.ReLU(inplace=False)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.relu3 = nn.ReLU(inplace=False)
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU(inplace=False)
        self.fc3 = nn.Linear(f2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc3(self.relu4(self.fc2(x)))


class MLP(nn.Module):
    """Flatten, then Linear-ReLU twice and a Linear head: 2 ReLU sites."""

    def __init__(self, num_classes: int, in_features: int, hidden: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU(inplace=False)
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU(inplace=False)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class ConvNet(nn.Module):
    """Four conv3x3+BN+ReLU (16, 32s2, 32 residual, 64), global average pool, linear: 4 ReLUs.

    The third conv is a one-conv residual block, relu3 after the add, so demos meet a stride-2
    conv, a plain conv-BN-ReLU chain and a shortcut, like the big models but in milliseconds.
    """

    def __init__(self, num_classes: int, in_channels: int, width: float) -> None:
        super().__init__()
        c1, c2, c3 = (scaled(c, width) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c2)
        self.relu3 = nn.ReLU(inplace=False)
        self.conv4 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(c3)
        self.relu4 = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(x + self.bn3(self.conv3(x)))
        x = self.relu4(self.bn4(self.conv4(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("lenet")
def lenet(num_classes: int, in_channels: int, width: float, image_size: int) -> LeNet5:
    """LeNet-5 (6, 16 conv channels; 120, 84 hidden units, times width): 4 ReLUs."""
    require(
        image_size >= 16,
        f"lenet needs image_size >= 16 (two 5x5 convs and two 2x2 pools), got {image_size}.",
    )
    return LeNet5(num_classes, in_channels, width, image_size)


@register_model("mlp")
def mlp(
    num_classes: int, in_channels: int, width: float, image_size: int, hidden: int = 128
) -> MLP:
    """Two hidden layers of scaled(hidden, width) units on the flattened image: 2 ReLUs."""
    require(
        isinstance(hidden, int) and not isinstance(hidden, bool) and hidden >= 1,
        f"mlp hidden must be a positive integer, got {hidden!r}.",
    )
    return MLP(num_classes, in_channels * image_size * image_size, scaled(hidden, width))


@register_model("convnet")
def convnet(num_classes: int, in_channels: int, width: float, image_size: int) -> ConvNet:
    """Tiny residual CNN (16, 32, 32, 64 channels times width): 4 ReLUs."""
    return ConvNet(num_classes, in_channels, width)
