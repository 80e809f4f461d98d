"""MobileNetV2 (CIFAR variant of the reference code and ImageNet variant): 35 ReLU6 sites."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from easier.models._common import check_probability, init_conv_bn, scaled
from easier.models._registry import register_model

# (expansion t, channels c, repeats n, first stride s); the CIFAR variant keeps 32x32 longer.
CIFAR_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                  (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip
IMAGENET_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def conv_bn_relu6(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    """Return Sequential(conv, BN, ReLU6): torchvision's Conv2dNormActivation, same indices."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when t=1) -> depthwise 3x3 -> project 1x1 + BN (linear bottleneck).

    The identity shortcut exists only for stride 1 and equal widths, as in torchvision.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(c_in * expand_ratio)
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(c_in, hidden, kernel=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's parameter names; every width scaled by `scaled(c, width)`.

    Unlike torchvision (which rounds to multiples of 8 and never shrinks the 1280-wide last
    layer), all channel counts, the 1280 included, follow the one width rule of this package.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        stem_stride: int = 1,
        settings: tuple[tuple[int, int, int, int], ...] = CIFAR_SETTINGS,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        c = scaled(32, width)
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, c, stride=stem_stride)]
        for t, ch, n, s in settings:
            c_out = scaled(ch, width)
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        self.last_channel = scaled(1280, width)
        layers.append(conv_bn_relu6(c, self.last_channel, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


@register_model("mobilenet_v2")
def mobilenet_v2(
    num_classes: int, in_channels: int, width: float, image_size: int, dropout: float = 0.2
) -> MobileNetV2:
    """CIFAR MobileNetV2 of the reference (stride-1 stem, (6,24,2,1)): 35 ReLU6, 10 adds."""
    return MobileNetV2(
        num_classes, in_channels, width, 1, CIFAR_SETTINGS, check_probability("dropout", dropout)
    )


@register_model("mobilenet_v2-imagenet")
def mobilenet_v2_imagenet(
    num_classes: int, in_channels: int, width: float, image_size: int, dropout: float = 0.2
) -> MobileNetV2:
    """torchvision's MobileNetV2 (stride-2 stem, (6,24,2,2)), used by the reference off CIFAR."""
    return MobileNetV2(
        num_classes, in_channels, width, 2, IMAGENET_SETTINGS, check_probability("dropout", dropout)
    )
