"""IDX files (the MNIST family's format) and the four-file sets: ``fashion-mnist``, ``idx:DIR``.

An IDX file is a 4-byte magic ``0x00 0x00 TYPE NDIM`` (TYPE 0x08 = unsigned byte), NDIM
big-endian uint32 dimensions, then the data row-major. Images are ``0x00000803`` (N, H, W),
labels ``0x00000801`` (N,). The files are read with numpy only (gzipped or plain).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from easier.data.common import ArrayDataset, describe_dir, split_train_val
from easier.data.spec import DataSplits, LoadOptions, register
from easier.data.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip
from easier.errors import DataError

__all__ = [
    "FASHION_CLASSES",
    "FASHION_DIR",
    "FASHION_MEAN",
    "FASHION_STD",
    "IDX_FILES",
    "IdxSet",
    "read_idx",
    "read_idx_set",
]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
# The four files of an MNIST-style set, as published (gzipped); plain (unzipped) names also work.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"
# Pixel mean/std (/255) of the 60,000 Fashion-MNIST training images.
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Share of the training images held out for validation (per seed, class-balanced): 5,000 of
# Fashion-MNIST's 60,000.
VAL_FRACTION = 1 / 12


def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """Return the uint8 array stored in the IDX file ``path`` (``.gz`` or plain).

    ``magic`` is the expected 4-byte magic (``IMAGES_MAGIC`` or ``LABELS_MAGIC``); a bad gzip
    stream, another magic, a zero dimension or a size that disagrees with the header raise one
    ``DataError`` naming the file.
    """
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{what}: cannot read {path}: {e}; the file is damaged") from e
    if len(raw) < 4:
        raise DataError(f"{what}: {path} is {len(raw)} bytes, too short for an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(
            f"{what}: {path} starts with magic 0x{got:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == IMAGES_MAGIC else 'labels'}, unsigned bytes); "
            "not an IDX file of this kind"
        )
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{what}: {path} is truncated inside its header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if 0 in dims:
        raise DataError(f"{what}: {path} declares dimensions {dims}; none may be 0")
    expected = head + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"{what}: {path} is {state}: {len(raw)} bytes, header {dims} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims).copy()


def _find(d: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (d / name).is_file():
            return d / name
    return None


@dataclass(frozen=True)
class IdxSet:
    """The arrays of a four-file IDX set: images uint8 (N, H, W), labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def read_idx_set(d: Path, what: str, *, missing_hint: str, num_classes: int = 10) -> IdxSet:
    """Return the four arrays of the IDX set in directory ``d``, checked against each other.

    ``missing_hint`` ends the one-line error for a missing directory or file. Labels must lie
    in ``0..num_classes-1``; image and label counts must agree, and both splits share H and W.
    """
    if not d.is_dir():
        raise DataError(f"{what}: {describe_dir(d)}; {missing_hint}")
    paths = {k: _find(d, stem) for k, stem in IDX_FILES.items()}
    missing = [f"{IDX_FILES[k]}.gz" for k, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"{what}: {d} lacks {', '.join(missing)} ({describe_dir(d)}); {missing_hint}"
        )
    arrays = {}
    for k, p in paths.items():
        assert p is not None
        magic = IMAGES_MAGIC if k.endswith("images") else LABELS_MAGIC
        arrays[k] = read_idx(p, magic, what)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(x) != len(y):
            raise DataError(
                f"{what}: {paths[f'{split}_images']} has {len(x)} images but "
                f"{paths[f'{split}_labels']} has {len(y)} labels"
            )
        if int(y.max()) >= num_classes:
            raise DataError(
                f"{what}: {paths[f'{split}_labels']} has label {int(y.max())}, outside "
                f"0..{num_classes - 1}"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(
            f"{what}: train images are {arrays['train_images'].shape[1:]} but test images "
            f"{arrays['test_images'].shape[1:]}"
        )
    return IdxSet(
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
    )


def _idx_splits(
    name: str,
    s: IdxSet,
    opts: LoadOptions,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    classes: tuple[str, ...],
    flip: bool,
) -> DataSplits:
    native = int(s.train_images.shape[-1])
    size = opts.image_size or native
    train, val = split_train_val(s.train_labels, VAL_FRACTION, opts.seed, name)
    norm = Normalize(mean, std)
    # Light augmentation: shifts of up to 2 px at 28 (zero-padded crop), plus a horizontal flip
    # for clothing (mirror-symmetric classes) but not for digits.
    aug = None
    if opts.augment:
        crop = RandomCrop(size, padding=max(1, round(size / 14)))
        aug = Compose([crop, RandomHorizontalFlip()]) if flip else crop
    pool = torch.from_numpy(np.ascontiguousarray(s.train_images)).unsqueeze(1)
    test = torch.from_numpy(np.ascontiguousarray(s.test_images)).unsqueeze(1)

    def part(x: torch.Tensor, y: np.ndarray, idx: np.ndarray, t=None) -> ArrayDataset:
        return ArrayDataset(x, y, idx, scale=255.0, image_size=size, normalize=norm, transform=t)

    return DataSplits(
        name=name,
        train=part(pool, s.train_labels, train, aug),
        train_eval=part(pool, s.train_labels, train),
        val=part(pool, s.train_labels, val),
        test=part(test, s.test_labels, np.arange(len(s.test_labels))),
        num_classes=len(classes),
        in_channels=1,
        image_size=size,
        mean=mean,
        std=std,
        classes=classes,
    )


@register(
    "fashion-mnist",
    needs_path=True,
    default_path=FASHION_DIR,
    help=f"Zalando's 70k 28x28 clothing images (55k/5k of train by seed; test = official 10k); "
    f"default {FASHION_DIR} ({FASHION_INSTALL}), or PATH holding the four IDX .gz files",
)
def load_fashion_mnist(opts: LoadOptions) -> DataSplits:
    """Return Fashion-MNIST: 55k/5k seeded class-balanced train/val, test = the official 10k.

    Augmentation (``augment=True``, train only): shift ≤ 2 px (crop 28, pad 2) and h-flip.
    """
    assert opts.path is not None
    hint = (
        f"install it with `{FASHION_INSTALL}` or give 'fashion-mnist:DIR' for a directory "
        f"holding {', '.join(f'{s}.gz' for s in IDX_FILES.values())}"
    )
    s = read_idx_set(opts.path, "fashion-mnist", missing_hint=hint)
    return _idx_splits(
        "fashion-mnist",
        s,
        opts,
        mean=FASHION_MEAN,
        std=FASHION_STD,
        classes=FASHION_CLASSES,
        flip=True,
    )


@register(
    "idx",
    needs_path=True,
    help="PATH holds an MNIST-style IDX set (train-images-idx3-ubyte.gz, train-labels-idx1-"
    "ubyte.gz, t10k-...); 1/12 of train for val, test = t10k; mean/std from the train images",
)
def load_idx(opts: LoadOptions) -> DataSplits:
    """Return any MNIST-layout IDX set: seeded 1/12 of train for val, test = the t10k files.

    Classes are ``0..max label``; normalised with the mean/std of all training pixels;
    augmentation (train only) is the shift of mnist5k (no flip: digits are not symmetric).
    """
    assert opts.path is not None
    hint = f"an IDX set holds {', '.join(f'{s}.gz' for s in IDX_FILES.values())} (or unzipped)"
    s = read_idx_set(opts.path, "idx", missing_hint=hint, num_classes=256)
    k = int(max(s.train_labels.max(), s.test_labels.max())) + 1
    # From the histogram of the 256 pixel values: exact, without a float copy of every pixel.
    hist = np.bincount(s.train_images.reshape(-1), minlength=256).astype(np.float64)
    v = np.arange(256) / 255.0
    m = float((hist * v).sum() / hist.sum())
    sd = float(np.sqrt(max((hist * (v - m) ** 2).sum() / hist.sum(), 0.0)))
    mean, std = (round(m, 4),), (round(sd, 4),)
    if std[0] <= 0:
        raise DataError(f"idx: every training pixel in {opts.path} is the same value")
    return _idx_splits(
        "idx", s, opts, mean=mean, std=std, classes=tuple(str(c) for c in range(k)), flip=False
    )
