"""Distributed primitives for running easier under ``torchrun`` (plain ``torch.distributed``).

Every function works unchanged in a single process: without torchrun's environment there is no
process group, loaders are the usual seeded ones, reductions return their input and
``wrap_ddp`` returns the model. Under torchrun:

- training shards with ``DistributedSampler`` (which pads so every rank runs the same number of
  steps: DDP would hang otherwise);
- the entropy pass and evaluation use *exact* shards: contiguous, batch-aligned, disjoint,
  covering each sample once. Concatenating the ranks' batches in rank order gives exactly the
  single-process ``make_loader(shuffle=False)`` batches, so summed counts, batch and sample
  counts are bit for bit those of one process.

Collectives that follow per-rank work first share a "failed" flag, so an error on one rank
(a NaN, a shape change) makes every rank raise instead of leaving the others waiting forever.
"""

from __future__ import annotations

import functools
import gc
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .entropy import ESTIMATORS, NEURONS, EntropyPass, EntropyReport, _Counter, batch_input
from .errors import ConfigError, DataError, EasierError, NonFiniteError, SiteError
from .sites import KINDS
from .train import make_loader, targets

__all__ = [
    "DistInfo",
    "all_reduce_counters",
    "barrier",
    "cleanup",
    "evaluate_distributed",
    "get_info",
    "init_from_env",
    "is_main",
    "main_only",
    "measure_entropy_distributed",
    "reduce_accuracy",
    "shard_indices_exact",
    "shard_loader",
    "unwrap",
    "wrap_ddp",
]

T = TypeVar("T")

# torchrun sets all of these; RANK/WORLD_SIZE alone decide whether we are under a launcher, so a
# stray MASTER_PORT in a user's shell does not turn a plain run into a broken distributed one.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE")
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among ``world_size`` and the device it computes on.

    ``enabled`` is True when a process group is live; a single process is rank 0 of 1.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ConfigError(
                f"DistInfo(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}): need 0 <= rank < world_size and local_rank >= 0"
            )

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r}: no CUDA device is available here; use 'cpu'")
    return dev


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={os.environ[name]!r} is not an integer; launch with "
            "torchrun, which sets it, or unset it for a single-process run"
        ) from None


def _cuda_index(local_rank: int, dev: torch.device) -> int:
    """The GPU of this rank: LOCAL_RANK, or 0 where the launcher shows each process one GPU."""
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index != local_rank and count > 1:
        raise ConfigError(
            f"device={str(dev)!r} under torchrun with LOCAL_RANK={local_rank}: each rank uses "
            "cuda:LOCAL_RANK; pass device='cuda' and let the launcher place the ranks"
        )
    if count == 1:
        return 0
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible; start at most "
            f"{count} process(es) per node (torchrun --nproc_per_node {count})"
        )
    return local_rank


def get_info(device: str | torch.device | None = None) -> DistInfo:
    """The DistInfo of the live process group, or the single-process one when there is none.

    ``device`` defaults to ``cuda:<current>`` with NCCL and to the CPU otherwise.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=_resolve_device(device or "cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        nccl = dist.get_backend() == "nccl"
        dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    else:
        dev = _resolve_device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return DistInfo(rank, world, local, True, dev)


def init_from_env(
    device: str | torch.device = "cpu", *, timeout_s: float | None = None
) -> DistInfo:
    """Join torchrun's process group if launched by it, else describe a single process.

    The backend follows the device: NCCL for CUDA (each rank on ``cuda:LOCAL_RANK``), gloo for
    the CPU. ``device="auto"`` picks CUDA when available. Calling it again returns the same
    DistInfo without re-initialising. ``timeout_s`` bounds how long collectives wait.
    """
    dev = _resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        return get_info(dev)
    if not any(v in os.environ for v in _LAUNCH_VARS):
        return DistInfo(device=dev)
    missing = [v for v in _ENV_VARS if v not in os.environ]
    if missing:
        raise ConfigError(
            f"found {[v for v in _ENV_VARS if v in os.environ]} in the environment but not "
            f"{missing}: launch with `torchrun --nproc_per_node N ...`, which sets all of "
            f"{list(_ENV_VARS)}, or unset RANK/WORLD_SIZE for a single-process run"
        )
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    if dev.type == "cuda":
        idx = _cuda_index(local, dev)
        torch.cuda.set_device(idx)
        dev = torch.device("cuda", idx)
        backend = "nccl" if dist.is_nccl_available() else "gloo"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"device={str(device)!r}: distributed runs support 'cpu' and 'cuda'")
    info = DistInfo(rank, world, local, True, dev)  # validates the ranks before connecting
    kwargs: dict[str, Any] = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs
    )
    return info


def _live() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if not _live():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if there is one (call once at the end of a torchrun script).

    Drop DDP wrappers first (``del ddp``): a wrapper alive at interpreter exit keeps the gloo
    group's threads alive, and their teardown aborted about 1 run in 10 here (torch 2.13, CPU).
    """
    if _live():
        gc.collect()  # free dropped DDP wrappers, whose reference cycles hold the group
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 and in a single process: the one process that writes files."""
    return not _live() or dist.get_rank() == 0


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only; other ranks get None without waiting.

    Follow it with :func:`barrier` when other ranks read what rank 0 wrote.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


# ---------------------------------------------------------------------------------------------
# data


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


# ---------------------------------------------------------------------------------------------
# reductions


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(values: Sequence[int], dev: torch.device) -> torch.Tensor:
    """(world, len(values)) int64 table of every rank's values; lengths must agree."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=dev)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows).cpu()


def _neurons(c: _Counter) -> int:
    t = c.on if c.on is not None else c.p_sum
    return -1 if t is None else int(t.shape[0])


def _sum_counters(
    counters: dict[str, _Counter], extra: Sequence[int], failed: bool
) -> tuple[list[int], list[int]]:
    """Sum counters in place across ranks; return (failed ranks, summed ``extra`` ints).

    When any rank failed, nothing is summed: the caller raises on every rank.
    """
    cs = list(counters.values())
    key = "\0".join(f"{n}|{c.estimator}|{c.neuron}" for n, c in counters.items())
    dev = _comm_device()
    head = _gather([zlib.crc32(key.encode()), int(failed), len(cs), len(extra)], dev)
    bad_ranks = [r for r in range(head.shape[0]) if head[r, 1]]
    if bad_ranks:
        return bad_ranks, list(extra)
    if not (head[:, [0, 2, 3]] == head[0, [0, 2, 3]]).all():
        raise DataError(
            "the ranks measured different sets of sites (or estimators): every rank must build "
            "the same model and call with the same sites=, estimator= and neuron="
        )
    sizes = _gather([_neurons(c) for c in cs], dev)
    for j, (name, c) in enumerate(counters.items()):
        col = sizes[:, j]
        have = sorted({int(v) for v in col if v >= 0})
        if len(have) > 1:
            raise DataError(
                f"site {name!r} has different numbers of neurons on different ranks "
                f"({dict(enumerate(col.tolist()))}; -1 = no data): with neuron='element' every "
                "sample must have the same shape"
            )
        if have and _neurons(c) < 0:  # this rank's shard was empty: contribute zeros
            c._allocate(torch.empty(0, have[0], device=dev))

    ints: list[torch.Tensor] = []
    floats: list[torch.Tensor] = []
    for c in cs:
        ints.append(torch.tensor([c.batches], dtype=torch.int64))
        ints += [t.reshape(-1) for t in (c.bad, c.on, c.off, c.seen) if t is not None]
        floats.append(torch.tensor([c.layer_sum], dtype=torch.float64))
        floats += [t.reshape(-1) for t in (c.p_sum, c.h_sum) if t is not None]
    ints.append(torch.tensor(list(extra), dtype=torch.int64))
    ibuf = torch.cat([t.to(dev) for t in ints])
    fbuf = torch.cat([t.to(dev) for t in floats])
    dist.all_reduce(ibuf)  # one call per dtype, not one per tensor: latency dominates
    dist.all_reduce(fbuf)
    ibuf, fbuf = ibuf.cpu(), fbuf.cpu()

    i = f = 0
    for c in cs:
        c.batches = int(ibuf[i])
        i += 1
        for t in (c.bad, c.on, c.off, c.seen):
            if t is not None:
                t.copy_(ibuf[i : i + t.numel()].view_as(t))
                i += t.numel()
        c.layer_sum = float(fbuf[f])
        f += 1
        for t in (c.p_sum, c.h_sum):
            if t is not None:
                t.copy_(fbuf[f : f + t.numel()].view_as(t))
                f += t.numel()
    return [], ibuf[i:].tolist()


def all_reduce_counters(counters: dict[str, _Counter], info: DistInfo | None = None) -> None:
    """Sum entropy counters across ranks in place (no-op in a single process).

    Integer counts (on/off/seen/bad, batches) come out exactly the single-process ones; the
    reference estimator's float sums equal them up to the order of additions. A rank whose shard
    was empty (counters never allocated) contributes zeros of the shape the others report.
    Every rank must pass counters for the same sites in the same order, else DataError.
    """
    info = info or get_info()
    if info.enabled:
        _sum_counters(counters, [], failed=False)


def reduce_accuracy(
    loss_sum: float, correct: int, count: int, info: DistInfo | None = None
) -> tuple[float, float]:
    """(mean loss, top-1 accuracy in %) from per-rank sums, as :func:`easier.train.evaluate`."""
    info = info or get_info()
    if info.enabled:
        t = torch.tensor(
            [float(loss_sum), float(correct), float(count)],
            dtype=torch.float64,
            device=_comm_device(),
        )
        dist.all_reduce(t)
        loss_sum, correct, count = float(t[0]), round(float(t[1])), round(float(t[2]))
    if count == 0:
        raise ConfigError("evaluation saw no samples on any rank: the dataset is empty")
    if not torch.isfinite(torch.tensor(loss_sum)):
        raise NonFiniteError("evaluation loss is not finite: the model produces NaN/Inf logits")
    return loss_sum / count, 100.0 * int(correct) / int(count)


# ---------------------------------------------------------------------------------------------
# model


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


# ---------------------------------------------------------------------------------------------
# passes


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
    if estimator not in ESTIMATORS:
        raise SiteError(f"estimator={estimator!r}; valid: {list(ESTIMATORS)}")
    if neuron not in NEURONS:
        raise SiteError(f"neuron={neuron!r}; valid: {list(NEURONS)}")
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
        failed_ranks, (counting.samples,) = _sum_counters(counting.counters, [counting.samples],
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

    Mirrors :func:`easier.train.evaluate`: the accuracy is the single-process one exactly, the
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
            x = batch_input(batch, input_key).to(dev)
            y = targets(batch).to(dev)
            logits = module(x)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
    finally:
        module.train(was)
    return reduce_accuracy(total, correct, seen, info)
