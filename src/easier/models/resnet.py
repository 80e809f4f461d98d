"""ResNet-18 as in the EASIER reference code: separate relu1/relu2 per block, so 17 ReLU sites."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from easier.models._common import init_conv_bn, scaled
from easier.models._registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-relu1-conv3x3-BN, add the shortcut, relu2.

    Two ReLU modules (not one reused, as in torchvision) so each call site can be measured and
    linearized on its own; parameter names match torchvision, so its state_dicts load.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """ResNet of BasicBlocks; `stem` 'cifar' (3x3/1 conv) or 'imagenet' (7x7/2), + max-pool."""

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        stem: str = "cifar",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=False)
        # The reference CIFAR ResNet keeps this max-pool too, so 32x32 inputs reach layer1 at 16x16.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = planes[0]
        stages = []
        for i, (n_blocks, p) in enumerate(zip(layers, planes, strict=True)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, p, stride))
                in_planes = p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_conv_bn(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model("resnet18")
def resnet18(
    num_classes: int,
    in_channels: int,
    width: float,
    image_size: int,
    zero_init_residual: bool = False,
) -> ResNet:
    """CIFAR ResNet-18 of the reference code (3x3 stride-1 stem, max-pool kept): 17 ReLUs."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width, "cifar", bool(zero_init_residual))


@register_model("resnet18-imagenet")
def resnet18_imagenet(
    num_classes: int,
    in_channels: int,
    width: float,
    image_size: int,
    zero_init_residual: bool = False,
) -> ResNet:
    """ImageNet ResNet-18 (7x7/2 stem + max-pool; the reference's `ResNet_orig`): 17 ReLUs."""
    return ResNet(
        (2, 2, 2, 2), num_classes, in_channels, width, "imagenet", bool(zero_init_residual)
    )
