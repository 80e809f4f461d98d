"""Datasets and tensor transforms: ``load("mnist5k")``, ``load("cifar10:PATH")``, ...

Every source returns a ``DataSplits`` whose items are ``(float32 CxHxW normalised image, int)``.
Importing this package registers the built-in sources; ``list_datasets()`` names them.
"""

from __future__ import annotations

from easier.data import builtin, cifar, folders, idx  # noqa: F401  (registers the sources)
from easier.data.common import TEST_SPLIT_SEED, ArrayDataset
from easier.data.folders import ImageFileDataset
from easier.data.spec import (
    DataSplits,
    LoadOptions,
    dataset_forms,
    list_datasets,
    load,
    parse_spec,
    register,
)
from easier.data.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomVerticalFlip,
    Resize,
)

__all__ = [
    "TEST_SPLIT_SEED",
    "ArrayDataset",
    "Compose",
    "DataSplits",
    "ImageFileDataset",
    "LoadOptions",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomVerticalFlip",
    "Resize",
    "dataset_forms",
    "list_datasets",
    "load",
    "parse_spec",
    "register",
]
