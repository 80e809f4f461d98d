"""CIFAR-10 from the standard python-pickle directory (``cifar-10-batches-py``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from easier.data.common import ArrayDataset, describe_dir, split_train_val
from easier.data.spec import DataSplits, LoadOptions, register
from easier.data.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip
from easier.errors import DataError

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "read_batch"]

# Per-channel statistics of the 50k training images (the std is the true pixel std; the
# often-copied 0.2023/0.1994/0.2010 are averages of per-image stds).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = "test_batch"
_SUBDIR = "cifar-10-batches-py"
_GET = "extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that builds only what a CIFAR batch holds: dicts, lists, str/bytes, arrays.

    A pickle can run arbitrary code; this keeps a stray or hostile file in the data directory
    from doing more than fail to load.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a batch never does")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise DataError(f"cifar10: cannot unpickle {path}: {e}; re-{_GET}") from e


def _get(d: dict, key: str) -> Any:
    return d.get(key.encode(), d.get(key))


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 3, 32, 32), labels int64) from one CIFAR-10 python batch file."""
    d = _unpickle(path)
    if not isinstance(d, dict):
        raise DataError(f"cifar10: {path} holds a {type(d).__name__}, not a batch dict; re-{_GET}")
    keys = ", ".join(repr(k) for k in d)
    data, labels = _get(d, "data"), _get(d, "labels")
    if data is None:
        raise DataError(f"cifar10: {path} has no b'data' entry (keys: {keys}); re-{_GET}")
    if labels is None:
        hint = " (this looks like CIFAR-100, which is not supported)" if b"fine_labels" in d else ""
        raise DataError(f"cifar10: {path} has no b'labels' entry (keys: {keys}){hint}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"cifar10: {path} b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
        )
    if len(labels) != len(data) or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
        raise DataError(
            f"cifar10: {path} has {len(data)} images but {len(labels)} labels, or labels "
            "outside 0..9"
        )
    # Each row is the 1024 red, then green, then blue values of a 32x32 image, row-major.
    return data.reshape(-1, 3, 32, 32), labels


def _batch_dir(path: Path) -> Path:
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise DataError(f"cifar10: {path} is an archive; extract it first (tar xzf {path})")
    for d in (path, path / _SUBDIR):
        if all((d / n).is_file() for n in (*_TRAIN, _TEST)):
            return d
    missing = [n for n in (*_TRAIN, _TEST) if not (path / n).is_file()]
    raise DataError(
        f"cifar10: {path} has no data_batch_1..5 / test_batch (missing: {', '.join(missing)}), "
        f"nor a {_SUBDIR}/ holding them; {describe_dir(path)}. {_GET.capitalize()}"
    )


def _class_names(d: Path) -> tuple[str, ...]:
    meta = d / "batches.meta"
    if not meta.is_file():
        return CIFAR10_CLASSES
    meta_d = _unpickle(meta)
    names = _get(meta_d, "label_names") if isinstance(meta_d, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        return CIFAR10_CLASSES
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


@register(
    "cifar10",
    needs_path=True,
    help="PATH holds data_batch_1..5, test_batch, batches.meta (or their cifar-10-batches-py/)",
)
def load_cifar10(opts: LoadOptions) -> DataSplits:
    """Return CIFAR-10: 90/10 seeded train/val split of the 50k, test = ``test_batch``.

    Augmentation (``augment=True``, train only): zero-padded random crop (padding 4 at 32 px)
    and horizontal flip; per-channel CIFAR-10 mean/std normalisation everywhere.
    """
    assert opts.path is not None
    d = _batch_dir(opts.path)
    parts = [read_batch(d / n) for n in _TRAIN]
    x_pool = np.concatenate([p[0] for p in parts])
    y_pool = np.concatenate([p[1] for p in parts])
    x_test, y_test = read_batch(d / _TEST)
    size = opts.image_size or 32
    train, val = split_train_val(y_pool, 0.1, opts.seed, "cifar10")
    norm = Normalize(CIFAR10_MEAN, CIFAR10_STD)
    aug = (
        Compose([RandomCrop(size, padding=round(size / 8)), RandomHorizontalFlip()])
        if opts.augment
        else None
    )
    pool = torch.from_numpy(x_pool)

    def part(x: torch.Tensor, y: np.ndarray, idx: np.ndarray, t: Compose | None = None):
        return ArrayDataset(x, y, idx, scale=255.0, image_size=size, normalize=norm, transform=t)

    return DataSplits(
        name="cifar10",
        train=part(pool, y_pool, train, aug),
        train_eval=part(pool, y_pool, train),
        val=part(pool, y_pool, val),
        test=part(torch.from_numpy(x_test), y_test, np.arange(len(y_test))),
        num_classes=10,
        in_channels=3,
        image_size=size,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        classes=_class_names(d),
    )
