"""Data loaders: the seeded single-process loader and this rank's shard under torchrun."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from easier.errors import ConfigError
from easier.parallel.runtime import DistInfo, get_info

__all__ = ["make_loader", "shard_indices_exact", "shard_loader", "targets"]


def make_loader(data: Dataset | DataLoader, batch_size: int, *, shuffle: bool, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (a DataLoader is passed through)."""
    if isinstance(data, DataLoader):
        return data
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      num_workers=num_workers, drop_last=drop_last)


def targets(batch: Any) -> torch.Tensor:
    """The labels of a batch: ``batch[1]`` of a tuple, or a dict's 'label'/'labels'."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict) and "label" in batch:
        return batch["label"]
    if isinstance(batch, dict) and "labels" in batch:
        return batch["labels"]
    raise ConfigError("training needs (input, target) batches or dicts with 'label(s)'")


def shard_indices_exact(n: int, rank: int, world: int, *, block: int = 1) -> range:
    """This rank's contiguous share of ``range(n)``: disjoint, covering every index once.

    Indices go in whole blocks of ``block`` (the last block may be short) and ranks get
    contiguous runs of blocks differing by at most one block, so with ``block=batch_size`` each
    rank's batches are exactly batches of the single-process sequential loader. No padding: a
    rank may get fewer indices, or none when there are fewer blocks than ranks.
    """
    if n < 0 or world < 1 or not 0 <= rank < world or block < 1:
        raise ConfigError(
            f"shard_indices_exact(n={n}, rank={rank}, world={world}, block={block}): need "
            "n >= 0, world >= 1, 0 <= rank < world and block >= 1"
        )
    blocks = -(-n // block)
    lo, hi = rank * blocks // world, (rank + 1) * blocks // world
    return range(min(lo * block, n), min(hi * block, n))


def shard_loader(
    dataset: Dataset | DataLoader,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    exact: bool = False,
    info: DistInfo | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """This rank's loader for ``epoch``; in a single process ``make_loader(seed=seed + epoch)``.

    Distributed, the default uses ``DistributedSampler(seed=seed)`` with ``set_epoch(epoch)``
    called, padding (or with ``drop_last`` dropping) the tail so all ranks run equally many
    steps: use it for training. ``exact=True`` gives :func:`shard_indices_exact` shards in order
    (no padding, ranks may differ by a batch): use it for the entropy pass and evaluation, never
    for DDP training. The single-process order is the current ``fine_tune`` order; the
    distributed order is DistributedSampler's, so a sharded epoch is another permutation.
    """
    info = info or get_info()
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    if exact and shuffle:
        raise ConfigError(
            "exact=True shards are for passes that see each sample once in order (entropy, "
            "evaluation); pass shuffle=False, or exact=False to shuffle training data"
        )
    if not info.enabled:
        return make_loader(
            dataset,
            batch_size,
            shuffle=shuffle,
            seed=seed + epoch,
            num_workers=num_workers,
            drop_last=drop_last,
        )
    if isinstance(dataset, DataLoader):
        raise ConfigError(
            "shard_loader got a DataLoader, which cannot be split across ranks; pass its "
            "dataset (loader.dataset) and batch size instead"
        )
    if exact:
        idx = shard_indices_exact(
            len(dataset),
            info.rank,
            info.world_size,  # type: ignore[arg-type]
            block=batch_size,
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=idx,
            num_workers=num_workers,
            drop_last=drop_last,
        )
    sampler = DistributedSampler(
        dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
    )
