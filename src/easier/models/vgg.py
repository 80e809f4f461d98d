"""VGG-16 with batch norm (cfg D): 13 conv ReLUs + 2 classifier ReLUs = 15 sites."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from easier.models._common import check_probability, init_conv_bn, require, scaled
from easier.models._registry import register_model

CFG_D: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
HEADS = ("auto", "imagenet", "cifar")


class VGG(nn.Module):
    """torchvision's VGG layout (same parameter names), with two adjustments for small images.

    Every max-pool uses ceil_mode=True, which changes nothing when the size divides by 32 (32,
    224) but keeps 28x28 (MNIST) from shrinking to 0x0 after the fifth pool (28->14->7->4->2->1).
    The 'cifar' head average-pools to 1x1 and uses 512 -> 512 -> 512 -> C; the 'imagenet' head
    pools to 7x7 and uses 512*7*7 -> 4096 -> 4096 -> C, as torchvision does. Both scale by width.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        head: str = "cifar",
        dropout: float = 0.5,
        cfg: tuple[int | str, ...] = CFG_D,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                c_out = scaled(int(v), width)
                layers += [
                    nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=False),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        pool, hidden = (7, 4096) if head == "imagenet" else (1, 512)
        hidden = scaled(hidden, width)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * pool * pool, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg16_bn")
def vgg16_bn(
    num_classes: int,
    in_channels: int,
    width: float,
    image_size: int,
    head: str = "auto",
    dropout: float = 0.5,
) -> VGG:
    """VGG-16-bn: 15 ReLUs. head='auto' picks 'imagenet' for image_size >= 224, else 'cifar'.

    Pass head='imagenet' at smaller sizes to match torchvision exactly (the reference code fed
    64x64 Tiny-ImageNet images to torchvision's vgg16_bn, whose 7x7 pool then replicates 2x2).
    """
    require(head in HEADS, f"vgg16_bn head must be one of {HEADS}, got {head!r}.")
    if head == "auto":
        head = "imagenet" if image_size >= 224 else "cifar"
    return VGG(num_classes, in_channels, width, head, check_probability("dropout", dropout))
