"""Sums across ranks: entropy counters, accuracy sums, and "did any rank fail" flags.

Each is a no-op in a single process. Collectives that follow per-rank work first share a
"failed" flag, so an error on one rank (a NaN, a shape change) makes every rank raise instead of
leaving the others waiting; a rank that froze or died makes the others time out
(:class:`easier.parallel.runtime.DistTimeoutError`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from easier.errors import ConfigError, DataError, NonFiniteError
from easier.parallel.runtime import DistInfo, comm_device, get_info

__all__ = ["all_finite", "all_reduce_counters", "any_failed", "reduce_accuracy", "sum_counters"]


def _zero_counts(c: Any, neurons: int, dev: torch.device) -> None:
    """Give a counter that saw no batch (an empty shard) zero counts of ``neurons`` neurons."""
    c.bad = torch.zeros((), dtype=torch.int64, device=dev)
    if c.estimator == "exact":
        c.on, c.off, c.seen = (torch.zeros(neurons, dtype=torch.int64, device=dev)
                               for _ in range(3))
    else:
        c.p_sum, c.h_sum = (torch.zeros(neurons, dtype=torch.float64, device=dev)
                            for _ in range(2))


def _gather(values: Sequence[int], dev: torch.device) -> torch.Tensor:
    """(world, len(values)) int64 table of every rank's values; lengths must agree."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=dev)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows).cpu()


def _neurons(c: Any) -> int:
    t = c.on if c.on is not None else c.p_sum
    return -1 if t is None else int(t.shape[0])


def sum_counters(
    counters: dict[str, Any], extra: Sequence[int], failed: bool
) -> tuple[list[int], list[int]]:
    """Sum counters in place across ranks; return (failed ranks, summed ``extra`` ints).

    ``counters`` are an :class:`easier.EntropyPass`'s ``counters`` (one per site).

    When any rank failed, nothing is summed: the caller raises on every rank.
    """
    cs = list(counters.values())
    key = "\0".join(f"{n}|{c.estimator}|{c.neuron}" for n, c in counters.items())
    dev = comm_device()
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
            _zero_counts(c, have[0], dev)

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


def all_reduce_counters(counters: dict[str, Any], info: DistInfo | None = None) -> None:
    """Sum entropy counters across ranks in place (no-op in a single process).

    Integer counts (on/off/seen/bad, batches) come out exactly the single-process ones; the
    reference estimator's float sums equal them up to the order of additions. A rank whose shard
    was empty (counters never allocated) contributes zeros of the shape the others report.
    Every rank must pass counters for the same sites in the same order, else DataError.
    """
    info = info or get_info()
    if info.enabled:
        sum_counters(counters, [], failed=False)


def reduce_accuracy(
    loss_sum: float, correct: int, count: int, info: DistInfo | None = None
) -> tuple[float, float]:
    """(mean loss, top-1 accuracy in %) from per-rank sums, as
    :func:`easier.train.finetune.evaluate`."""
    info = info or get_info()
    if info.enabled:
        t = torch.tensor(
            [float(loss_sum), float(correct), float(count)],
            dtype=torch.float64,
            device=comm_device(),
        )
        dist.all_reduce(t)
        loss_sum, correct, count = float(t[0]), round(float(t[1])), round(float(t[2]))
    if count == 0:
        raise ConfigError("evaluation saw no samples on any rank: the dataset is empty")
    if not torch.isfinite(torch.tensor(loss_sum)):
        raise NonFiniteError("evaluation loss is not finite: the model produces NaN/Inf logits")
    return loss_sum / count, 100.0 * int(correct) / int(count)


def all_finite(loss: torch.Tensor, info: DistInfo) -> bool:
    """Whether the loss is finite on every rank (so all ranks stop together on a NaN)."""
    ok = bool(torch.isfinite(loss))
    if info.enabled:
        flag = torch.tensor([0.0 if ok else 1.0], device=loss.device)
        dist.all_reduce(flag)
        ok = float(flag) == 0.0
    return ok


def any_failed(failed: bool, info: DistInfo | None = None) -> list[int]:
    """The ranks whose ``failed`` is True (every rank learns them); [] in a single process
    unless ``failed``. Call it on every rank after per-rank work that may fail."""
    info = info or get_info()
    if not info.enabled:
        return [0] if failed else []
    flags = torch.zeros(info.world_size, dtype=torch.int64, device=comm_device())
    flags[info.rank] = int(failed)
    dist.all_reduce(flags)
    return [r for r in range(info.world_size) if flags[r]]
