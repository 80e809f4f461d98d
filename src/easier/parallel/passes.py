"""DDP wrapping and the sharded passes: entropy measurement and evaluation across ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from easier.entropy.estimate import EntropyPass, EntropyReport, batch_input
from easier.errors import ConfigError, DataError, EasierError
from easier.graph.capture import call_model, logits_of, to_device
from easier.graph.sites import KINDS
from easier.parallel.collectives import reduce_accuracy, sum_counters
from easier.parallel.loaders import shard_indices_exact, shard_loader, targets
from easier.parallel.runtime import DistInfo, get_info
from easier.train.objective import cross_entropy, hits

__all__ = ["evaluate_distributed", "measure_entropy_distributed", "unwrap", "wrap_ddp"]


def wrap_ddp(model: nn.Module, info: DistInfo | None = None, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` on the rank's device when distributed, else ``model``.

    Site discovery, linearize and fold work on the plain module: pass them :func:`unwrap`.
    """
    info = info or get_info()
    if not info.enabled:
        return model
    model.to(info.device)
    if info.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [info.device.index])
        ddp_kwargs.setdefault("output_device", info.device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _first_input(dataset: Dataset, batch_size: int, input_key: str | None) -> Any:
    """The first batch of the whole dataset, as one process sees it (sites record its shape).

    Every rank probes with it, so a rank whose shard is empty still finds the same sites.
    """
    return batch_input(next(iter(DataLoader(dataset, batch_size=batch_size))), input_key)


@torch.no_grad()
def measure_entropy_distributed(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    info: DistInfo | None = None,
    *,
    sites: Sequence[str] | None = None,
    neuron: str = "channel",
    channel_axis: int | dict[str, int] | None = None,
    estimator: str = "exact",
    input_key: str | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    kinds: Sequence[str] = KINDS,
    check_finite: bool = True,
    progress: bool = False,
    num_workers: int = 0,
) -> EntropyReport:
    """The EntropyReport of ``dataset`` measured across ranks, equal on every rank.

    Each rank counts its exact shard (batch-aligned), then the counts are summed, so the report
    equals ``measure_entropy(model, make_loader(dataset, batch_size, shuffle=False), ...)`` bit
    for bit for the exact estimator (the reference estimator's floats up to rounding).
    ``max_batches`` keeps the first batches of the whole dataset, as in one process. Options are
    those of :func:`easier.measure_entropy`. An error on any rank raises on all of them.
    """
    info = info or get_info()
    model = unwrap(model)
    if isinstance(dataset, DataLoader):
        raise ConfigError(
            "measure_entropy_distributed needs a Dataset (loader.dataset), not a "
            "DataLoader: the dataset is split across ranks here"
        )
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ConfigError(f"batch_size={batch_size}, max_batches={max_batches}: need >= 1")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError(
            "measure_entropy_distributed got an empty dataset; pass at least one sample"
        )
    limit = n if max_batches is None else min(n, max_batches * batch_size)
    # the single-process pass itself (options checked there, same counters); only the shard
    # and the sum of the counters are distributed
    counting = EntropyPass(model, _first_input(dataset, batch_size, input_key), sites,
                           neuron=neuron, channel_axis=channel_axis, estimator=estimator,
                           kinds=kinds, check_finite=check_finite, device=device)
    idx = shard_indices_exact(limit, info.rank, info.world_size, block=batch_size)
    stream = DataLoader(dataset, batch_size=batch_size, sampler=idx, num_workers=num_workers)
    failure: Exception | None = None
    try:
        counting.run(stream, input_key=input_key, progress=progress and info.is_main)
    except Exception as exc:  # re-raised below, once the other ranks know to stop too
        failure = exc
    finally:
        counting.close()
    failed_ranks: list[int] = []
    if info.enabled:
        failed_ranks, (counting.samples,) = sum_counters(counting.counters, [counting.samples],
                                                          failed=failure is not None)
    if failure is not None:
        raise failure
    if failed_ranks:
        raise EasierError(
            f"rank(s) {failed_ranks} failed while measuring entropy (their log has the error); "
            f"rank {info.rank} stops too"
        )
    return counting.report()


@torch.no_grad()
def evaluate_distributed(
    model: nn.Module,
    dataset: Dataset,
    info: DistInfo | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    input_key: str | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, top-1 %) over ``dataset`` split exactly across ranks.

    Mirrors :func:`easier.train.finetune.evaluate` (tensor, tuple or dict batches; tensor, tuple or
    ``ModelOutput`` results): the accuracy is the single-process one exactly, the
    loss up to the order of additions. Restores the model's mode.
    """
    info = info or get_info()
    module = unwrap(model)  # no DDP forward: ranks may run different numbers of batches
    dev = torch.device(device) if device is not None else info.device
    was = module.training
    module.to(dev).eval()
    total, correct, seen = 0.0, 0, 0
    try:
        for batch in shard_loader(
            dataset, batch_size, shuffle=False, seed=0, epoch=0, exact=True, info=info
        ):
            x = to_device(batch_input(batch, input_key), dev)  # a tensor, tuple or dict
            y = targets(batch).to(dev)
            logits = logits_of(call_model(module, x))  # a tensor, a tuple or a ModelOutput
            total += float(cross_entropy(logits, y, x, reduction="sum"))
            hit, counted = hits(logits, y, x)
            correct += hit
            seen += counted
    finally:
        module.train(was)
    return reduce_accuracy(total, correct, seen, info)
