"""Helpers shared by the model families: width scaling, size checks and torchvision-style init."""

from __future__ import annotations

import math

from torch import nn

from easier.errors import ConfigError


def scaled(channels: int, width: float) -> int:
    """Return `channels * width` rounded half up, at least 1: the one width rule of every model."""
    return max(1, math.floor(channels * width + 0.5))


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`: builders reject impossible sizes before building."""
    if not ok:
        raise ConfigError(message)


def check_probability(what: str, p: float) -> float:
    """Return `p` as a float after checking 0 <= p < 1 (a dropout-like rate)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1), got {p!r}.")
    return float(p)


def init_conv_bn(model: nn.Module, linear_std: float | None = None) -> None:
    """Initialise like torchvision's CNNs: Kaiming fan-out convs, BN (1, 0), optional N(0, std) FCs.

    `linear_std=None` leaves nn.Linear at PyTorch's default, as torchvision's ResNet does.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
