"""Image transforms on CxHxW float tensors, plus Pillow helpers for image files (no torchvision).

Randomness: every random transform takes an optional ``generator``. With ``generator=None`` the
numbers come from torch's global RNG of the process that calls it. In a DataLoader worker that RNG
is seeded from the loader's own ``generator`` (base seed + worker id), so a loader built with a
seeded ``torch.Generator`` replays the same augmentation; with ``num_workers=0`` the items are made
in the main process, so call ``torch.manual_seed`` (or pass an explicit generator) instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from easier.errors import ConfigError, DataError

if TYPE_CHECKING:  # Pillow is optional; only the file-based datasets need it
    from PIL.Image import Image

Transform = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomVerticalFlip",
    "Resize",
    "image_to_tensor",
    "load_image",
    "pil_to_tensor",
    "resize_center_crop",
]


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """Return ``size`` as ``(height, width)``, rejecting non-positive values."""
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ConfigError(f"{what}: size must be positive, got {tuple(size)}")
    return h, w


def _check_image(x: torch.Tensor, what: str) -> None:
    if x.dim() != 3:
        raise DataError(f"{what} expects a CxHxW image tensor, got shape {tuple(x.shape)}")


class Compose:
    """Apply transforms in order; ``Compose([])`` is the identity."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Normalize:
    """Return ``(x - mean) / std`` per channel; the inverse is ``x * std + mean``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or not mean:
            raise ConfigError(
                f"Normalize: mean {mean} and std {std} need the same, non-zero length"
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"Normalize: every std must be > 0, got {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "Normalize")
        if x.shape[0] != len(self.mean):
            raise DataError(
                f"Normalize has {len(self.mean)} channel(s) but the image has {x.shape[0]}"
            )
        return (x - self._mean.to(x)) / self._std.to(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Return the un-normalised image, e.g. to look at or check pixel values."""
        return x * self._std.to(x) + self._mean.to(x)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class Resize:
    """Resize to ``size`` exactly with bilinear interpolation (antialiased when shrinking)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size, "Resize")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "Resize")
        if tuple(x.shape[-2:]) == self.size:
            return x
        shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
        y = F.interpolate(
            x.unsqueeze(0), size=self.size, mode="bilinear", align_corners=False, antialias=shrink
        )
        return y.squeeze(0)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then cut a random ``size`` window.

    With padding p and an input of the output size, the content moves by up to p pixels in each
    direction and the uncovered border is 0 (black, as the padding happens before normalisation).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        padding: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        if padding < 0:
            raise ConfigError(f"RandomCrop: padding must be >= 0, got {padding}")
        self.size = _pair(size, "RandomCrop")
        self.padding = int(padding)
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "RandomCrop")
        if self.padding:
            x = F.pad(x, [self.padding] * 4)
        h, w = self.size
        H, W = x.shape[-2:]
        if h > H or w > W:
            raise DataError(f"RandomCrop{self.size}: padded image is only {H}x{W}")
        top = int(torch.randint(0, H - h + 1, (1,), generator=self.generator))
        left = int(torch.randint(0, W - w + 1, (1,), generator=self.generator))
        return x[:, top : top + h, left : left + w]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class _RandomFlip:
    dim = -1

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, type(self).__name__)
        # Always draw, so that the random stream does not depend on p.
        if float(torch.rand((), generator=self.generator)) < self.p:
            return x.flip(self.dim)
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomHorizontalFlip(_RandomFlip):
    """Mirror left-right with probability ``p``."""

    dim = -1


class RandomVerticalFlip(_RandomFlip):
    """Mirror top-bottom with probability ``p``."""

    dim = -2


class RandomResizedCrop:
    """Cut a random window of ``scale`` x area and ``ratio`` aspect, resize it to ``size``.

    The lightweight counterpart of torchvision's transform of the same name (10 tries, then a
    centre crop of the clamped aspect ratio), used for the 224-px folder datasets.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"RandomResizedCrop: bad scale {scale} or ratio {ratio}")
        self.size = _pair(size, "RandomResizedCrop")
        self.scale = scale
        self.ratio = ratio
        self.generator = generator
        self._resize = Resize(self.size)

    def _window(self, H: int, W: int) -> tuple[int, int, int, int]:
        g = self.generator
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = H * W * float(torch.empty(()).uniform_(*self.scale, generator=g))
            r = math.exp(float(torch.empty(()).uniform_(*log_r, generator=g)))
            w = round(math.sqrt(area * r))
            h = round(math.sqrt(area / r))
            if 0 < w <= W and 0 < h <= H:
                top = int(torch.randint(0, H - h + 1, (1,), generator=g))
                left = int(torch.randint(0, W - w + 1, (1,), generator=g))
                return top, left, h, w
        r = min(max(W / H, self.ratio[0]), self.ratio[1])
        w, h = (W, round(W / r)) if r > W / H else (round(H * r), H)
        return (H - h) // 2, (W - w) // 2, h, w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, "RandomResizedCrop")
        top, left, h, w = self._window(x.shape[-2], x.shape[-1])
        return self._resize(x[:, top : top + h, left : left + w])

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError(
            "reading image files needs Pillow, which is not installed; "
            "run `pip install pillow` (or `pip install easier[data]`)"
        ) from e
    return Image


def load_image(path: str | Path, mode: str | None = "RGB") -> Image:
    """Return the decoded image at ``path`` converted to ``mode`` (``None``: as stored).

    DataError if the file is unreadable or over Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS`` pixels).
    """
    Image = _pil()
    try:
        with warnings.catch_warnings():
            # over MAX_IMAGE_PIXELS Pillow only warns (errors at twice that): refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if mode is None:
                    im.load()
                    return im.copy()
                return im.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(
            f"image {path} is too large to decode safely: {e} Pillow refuses images over "
            f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS) as possible "
            "decompression bombs; shrink the file, or raise that limit if you trust it"
        ) from None
    except (OSError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(
            f"cannot read image {path}: {e}; delete or replace the file and try again"
        ) from e


# Pillow modes holding one channel of more than 8 bits, and the value that maps to 1.0
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
               "I": 65535.0, "F": 1.0}


def image_to_tensor(img: Image, size: int | None = None, *, what: str = "image") -> torch.Tensor:
    """Return a float32 3xHxW tensor in [0, 1] from a Pillow image of any mode.

    Each mode is scaled by its real range: 8-bit modes (L, LA, P, RGB, RGBA, CMYK, ...) through
    RGB by 1/255, mode 1 to 0/1, 16-bit grayscale (I;16*) by 1/65535, 32-bit integer (I) by
    1/65535 (it is how 16-bit PNG/TIFF data is often stored; values outside 0..65535 are a
    DataError), float (F) as is (non-finite values are a DataError). Alpha is dropped, as
    ``convert("RGB")`` does. Gray images are repeated on the three channels. ``size`` resizes
    the shorter side and centre-crops (bilinear, as :func:`resize_center_crop`); ``what``
    names the image in errors.
    """
    Image = _pil()
    if img.mode not in _WIDE_MODES:
        rgb = img.convert("RGB")
        return pil_to_tensor(resize_center_crop(rgb, size) if size else rgb)
    a = np.asarray(img)
    if img.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(
            f"{what}: 32-bit integer pixels range over {int(a.min())}..{int(a.max())}, outside "
            "0..65535, so their brightness scale is unknown; save it as 8- or 16-bit"
        )
    a = a.astype(np.float32) / np.float32(_WIDE_MODES[img.mode])
    if not np.isfinite(a).all():
        raise DataError(f"{what}: the float image holds NaN or Inf pixels; fix or remove it")
    if size:
        a = np.asarray(resize_center_crop(Image.fromarray(a), size), dtype=np.float32)
    return torch.from_numpy(a.copy()).unsqueeze(0).expand(3, -1, -1).contiguous()


def resize_center_crop(img: Image, size: int) -> Image:
    """Return ``img`` resized so its shorter side is ``size``, then centre-cropped to a square."""
    Image = _pil()
    if size <= 0:
        raise ConfigError(f"resize_center_crop: size must be positive, got {size}")
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img: Image) -> torch.Tensor:
    """Return a float32 CxHxW tensor in [0, 1] from an 8-bit Pillow image."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.transpose(2, 0, 1).copy()).float().div_(255.0)
