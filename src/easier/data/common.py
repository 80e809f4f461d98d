"""Pieces shared by the sources: seeded stratified splits, array-backed datasets, error help."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from easier.data.transforms import Normalize, Resize, Transform
from easier.errors import ConfigError, DataError

__all__ = [
    "TEST_SPLIT_SEED",
    "ArrayDataset",
    "describe_dir",
    "save_npz_atomic",
    "split_counts",
    "split_train_val",
    "split_train_val_test",
    "stratified_order",
]

# Test splits carved out of a single pool use this seed, never the user's: results for different
# seeds are then measured on the same test images, as with the official CIFAR/Tiny-ImageNet tests.
TEST_SPLIT_SEED = 20240909


def _rng(seed: int) -> np.random.RandomState:
    # RandomState, not default_rng: its streams are frozen across NumPy versions, so a split
    # recorded as "seed 3" stays the same split after an upgrade.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return np.random.RandomState(int(seed))


def stratified_order(labels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Return a permutation of ``range(len(labels))`` whose every prefix is class-balanced.

    Each class is shuffled and its k-th member gets the key (k + 0.5) / class_size; sorting by
    key (ties in shuffled order) interleaves the classes, so cutting the result at any point gives
    class c its proportional share to within (1 + p_c·(C − 2))/2 samples (p_c its fraction, C
    classes): under one sample for balanced classes, a little over for one dominant class
    among several small ones.
    """
    labels = np.asarray(labels)
    n = len(labels)
    perm = rng.permutation(n)
    _, cls, counts = np.unique(labels[perm], return_inverse=True, return_counts=True)
    by_class = np.argsort(cls, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - starts[cls[by_class]]
    key = (rank + 0.5) / counts[cls]
    return perm[np.lexsort((np.arange(n), key))]


def split_counts(n: int, fractions: Sequence[float], what: str) -> list[int]:
    """Return part sizes summing to ``n``; parts after the first are rounded ``fraction * n``."""
    rest = [round(f * n) for f in fractions[1:]]
    counts = [n - sum(rest), *rest]
    if min(counts) <= 0:
        pct = "/".join(f"{round(100 * f)}" for f in fractions)
        raise DataError(
            f"{what}: only {n} samples, too few for a {pct} split (sizes {counts}); "
            "add images or give explicit train/ val/ test/ folders"
        )
    return counts


def split_train_val(
    labels: np.ndarray, val_fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, val) index arrays, a stratified split of ``labels`` seeded by ``seed``."""
    n_train, _ = split_counts(len(labels), (1 - val_fraction, val_fraction), what)
    order = stratified_order(labels, _rng(seed))
    return order[:n_train], order[n_train:]


def split_train_val_test(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (train, val, test) index arrays: test fixed by TEST_SPLIT_SEED, train/val by seed."""
    labels = np.asarray(labels)
    n_train, _, n_test = split_counts(len(labels), fractions, what)
    first = stratified_order(labels, _rng(TEST_SPLIT_SEED))
    test, pool = first[:n_test], first[n_test:]
    second = pool[stratified_order(labels[pool], _rng(seed))]
    return second[:n_train], second[n_train:], test


def describe_dir(path: Path, limit: int = 12) -> str:
    """Return a short account of what is at ``path``, for error messages."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a directory"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return f"{path} is empty"
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return "found: " + ", ".join(names[:limit]) + more


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` so that readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with 0o666 (minus the umask), not mkstemp, whose files are private (0600)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArrayDataset(Dataset):
    """Samples ``indices`` of an in-memory uint8 image array, turned into normalised tensors.

    The array is shared, not copied, between the splits. Per item: divide by ``scale``, resize to
    ``image_size`` if needed, apply ``transform`` (augmentation, in [0, 1] space), normalise.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: np.ndarray,
        indices: np.ndarray,
        *,
        scale: float,
        image_size: int,
        normalize: Normalize,
        transform: Transform | None = None,
    ) -> None:
        if images.dim() != 4 or len(images) != len(labels):
            raise DataError(
                f"ArrayDataset needs images (N, C, H, W) and N labels, got {tuple(images.shape)} "
                f"and {len(labels)}"
            )
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.scale = float(scale)
        self.image_size = int(image_size)
        self.normalize = normalize
        self.transform = transform
        self._resize = None if images.shape[-1] == image_size else Resize(image_size)

    @property
    def targets(self) -> np.ndarray:
        """Return the labels of this split, in item order."""
        return self.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        x = self.images[j].float().div_(self.scale)
        if self._resize is not None:
            x = self._resize(x)
        if self.transform is not None:
            x = self.transform(x)
        return self.normalize(x), int(self.labels[j])

    def __repr__(self) -> str:
        aug = f", transform={self.transform!r}" if self.transform is not None else ""
        return f"ArrayDataset(n={len(self)}, image_size={self.image_size}{aug})"
