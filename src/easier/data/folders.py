"""Image-file datasets read lazily with Pillow: ``tiny-imagenet`` and ``imagefolder``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from easier.data.common import describe_dir, split_train_val, split_train_val_test
from easier.data.spec import DataSplits, LoadOptions, register
from easier.data.transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Transform,
    image_to_tensor,
    load_image,
)
from easier.errors import DataError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageFileDataset"]

# ImageNet statistics: what pretrained backbones expect, and close enough for these photos.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_SPLITS = ("train", "val", "test")


class ImageFileDataset(Dataset):
    """``(path, label)`` samples decoded on access: RGB, shorter side resized to ``image_size``
    and centre-cropped, then ``transform`` (augmentation, in [0, 1] space), then normalised.

    Pixels are scaled by the range of the file's mode (8-bit by 1/255, 16-bit by 1/65535, see
    :func:`easier.data.transforms.image_to_tensor`); gray images fill all three channels."""

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        *,
        image_size: int,
        normalize: Normalize,
        transform: Transform | None = None,
    ) -> None:
        self.samples = samples
        self.image_size = int(image_size)
        self.normalize = normalize
        self.transform = transform

    @property
    def targets(self) -> np.ndarray:
        """Return the labels of this split, in item order."""
        return np.array([y for _, y in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = load_image(path, None)
        x = image_to_tensor(img, self.image_size, what=f"image {path}")
        if self.transform is not None:
            x = self.transform(x)
        return self.normalize(x), label

    def __repr__(self) -> str:
        aug = f", transform={self.transform!r}" if self.transform is not None else ""
        return f"ImageFileDataset(n={len(self)}, image_size={self.image_size}{aug})"


def _images(d: Path) -> list[Path]:
    """Return the image files under ``d`` (recursively), sorted, hidden entries skipped."""
    return sorted(
        p
        for p in d.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(d).parts)
        and p.is_file()
    )


def _subdirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _splits(
    name: str,
    train: list[tuple[Path, int]],
    train_eval: list[tuple[Path, int]],
    val: list[tuple[Path, int]],
    test: list[tuple[Path, int]] | None,
    classes: tuple[str, ...],
    size: int,
    augment: Transform | None,
) -> DataSplits:
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def part(s: list[tuple[Path, int]], t: Transform | None = None) -> ImageFileDataset:
        return ImageFileDataset(s, image_size=size, normalize=norm, transform=t)

    return DataSplits(
        name=name,
        train=part(train, augment),
        train_eval=part(train_eval),
        val=part(val),
        test=None if test is None else part(test),
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        classes=classes,
    )


def _take(samples: list[tuple[Path, int]], idx: np.ndarray) -> list[tuple[Path, int]]:
    return [samples[int(i)] for i in idx]


# --- Tiny-ImageNet-200 ---------------------------------------------------------------------

_TINY_LAYOUT = (
    "wnids.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt and val/images/ "
    "(tiny-imagenet-200.zip, extracted)"
)


def _tiny_root(path: Path) -> Path:
    for d in (path, path / "tiny-imagenet-200"):
        if (d / "wnids.txt").is_file() and (d / "train").is_dir():
            return d
    raise DataError(
        f"tiny-imagenet: {path} is not a Tiny-ImageNet directory; expected {_TINY_LAYOUT}; "
        f"{describe_dir(path)}"
    )


@register(
    "tiny-imagenet",
    needs_path=True,
    help=f"PATH holds {_TINY_LAYOUT}",
)
def load_tiny_imagenet(opts: LoadOptions) -> DataSplits:
    """Return Tiny-ImageNet-200: train split 90/10 seeded into train/val; test = official val/.

    The official test/ images are unlabelled, so the labelled val/ serves as the test split.
    Augmentation (``augment=True``, train only): horizontal flip, as in the EASIER paper.
    """
    assert opts.path is not None
    root = _tiny_root(opts.path)
    wnids = (root / "wnids.txt").read_text().split()
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"tiny-imagenet: {root / 'wnids.txt'} is empty or repeats a wnid")
    label = {w: k for k, w in enumerate(wnids)}
    pool: list[tuple[Path, int]] = []
    for w in wnids:
        d = root / "train" / w
        d = d / "images" if (d / "images").is_dir() else d
        files = _images(d) if d.is_dir() else []
        if not files:
            raise DataError(
                f"tiny-imagenet: class {w} (from wnids.txt) has no images in {d}; {describe_dir(d)}"
            )
        pool += [(f, label[w]) for f in files]

    ann = root / "val" / "val_annotations.txt"
    images = root / "val" / "images"
    if not ann.is_file() or not images.is_dir():
        raise DataError(
            f"tiny-imagenet: {root / 'val'} needs val_annotations.txt and images/ (the labelled "
            f"val set is used as the test split); {describe_dir(root / 'val')}"
        )
    test: list[tuple[Path, int]] = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise DataError(f"tiny-imagenet: {ann}:{n} is not 'FILE<TAB>WNID ...': {line!r}")
        fname, w = fields[0].strip(), fields[1].strip()
        if w not in label:
            raise DataError(
                f"tiny-imagenet: {ann}:{n} names wnid {w!r}, which is not in wnids.txt; "
                "the annotations and wnids.txt come from different copies"
            )
        if not (images / fname).is_file():
            raise DataError(f"tiny-imagenet: {ann}:{n} names {fname}, missing from {images}")
        test.append((images / fname, label[w]))
    if not test:
        raise DataError(f"tiny-imagenet: {ann} lists no images")

    words: dict[str, str] = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            w, _, text = line.partition("\t")
            words[w.strip()] = text.split(",")[0].strip()
    classes = tuple(words.get(w) or w for w in wnids)

    size = opts.image_size or 64
    tr, va = split_train_val(np.array([y for _, y in pool]), 0.1, opts.seed, "tiny-imagenet")
    train = _take(pool, tr)
    aug = RandomHorizontalFlip() if opts.augment else None
    return _splits("tiny-imagenet", train, train, _take(pool, va), test, classes, size, aug)


# --- ImageFolder (train/ val/ test/ of class folders) --------------------------------------

_FOLDER_LAYOUT = (
    "train/, val/, test/ each holding one folder of images per class, "
    "or class folders directly under PATH"
)


def _scan(d: Path, classes: dict[str, int] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Return (samples, class names) of the class folders in ``d``; labels from ``classes``."""
    names = _subdirs(d)
    if not names:
        raise DataError(
            f"imagefolder: {d} has no class folders; expected {_FOLDER_LAYOUT}; {describe_dir(d)}"
        )
    if classes is None:
        classes = {c: k for k, c in enumerate(names)}
    samples: list[tuple[Path, int]] = []
    for c in names:
        if c not in classes:
            raise DataError(
                f"imagefolder: {d / c} is a class that train/ does not have; "
                f"rename or remove it (train/ classes: {', '.join(sorted(classes))})"
            )
        files = _images(d / c)
        if not files:
            raise DataError(
                f"imagefolder: class folder {d / c} has no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); {describe_dir(d / c)}"
            )
        samples += [(f, classes[c]) for f in files]
    return samples, names


@register(
    "imagefolder",
    needs_path=True,
    help=f"PATH holds {_FOLDER_LAYOUT}",
)
def load_imagefolder(opts: LoadOptions) -> DataSplits:
    """Return class-folder splits; classes are the sorted folder names of train/.

    With train/ and val/ and test/, they are used as they are. Without val/, val is a seeded
    10% of train/; without test/, there is no test split. With a single split folder, or class
    folders directly under PATH, the images are split 80/10/10 (test fixed, train/val seeded).
    Images: shorter side resized to ``image_size`` (default 224) and centre-cropped.
    Augmentation (``augment=True``, train only): random resized crop (80-100% of the area, aspect
    3/4..4/3) back to ``image_size`` and horizontal flip.
    """
    assert opts.path is not None
    path = opts.path
    if not path.is_dir():
        raise DataError(f"imagefolder: expected {_FOLDER_LAYOUT}; {describe_dir(path)}")
    sub = _subdirs(path)
    present = [s for s in _SPLITS if s in sub]
    others = [s for s in sub if s not in _SPLITS]
    if present and others:
        raise DataError(
            f"imagefolder: {path} mixes split folders ({', '.join(present)}) with other folders "
            f"({', '.join(others)}); use either {_FOLDER_LAYOUT}"
        )
    size = opts.image_size or 224
    aug = (
        Compose([RandomResizedCrop(size, scale=(0.8, 1.0)), RandomHorizontalFlip()])
        if opts.augment
        else None
    )
    if len(present) >= 2:
        if "train" not in present:
            raise DataError(
                f"imagefolder: {path} has {' and '.join(present)} but no train/; add train/"
            )
        train, names = _scan(path / "train", None)
        label = {c: k for k, c in enumerate(names)}
        test = _scan(path / "test", label)[0] if "test" in present else None
        if "val" in present:
            val = _scan(path / "val", label)[0]
        else:
            tr, va = split_train_val(np.array([y for _, y in train]), 0.1, opts.seed, "imagefolder")
            train, val = _take(train, tr), _take(train, va)
        return _splits("imagefolder", train, train, val, test, tuple(names), size, aug)

    pool_dir = path / present[0] if present else path
    pool, names = _scan(pool_dir, None)
    tr, va, te = split_train_val_test(
        np.array([y for _, y in pool]), (0.8, 0.1, 0.1), opts.seed, "imagefolder"
    )
    train = _take(pool, tr)
    return _splits(
        "imagefolder", train, train, _take(pool, va), _take(pool, te), tuple(names), size, aug
    )
