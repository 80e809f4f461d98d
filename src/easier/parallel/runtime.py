"""The process group: join torchrun's, describe where this process sits, wait, time out, leave.

Every function works unchanged in a single process (rank 0 of 1, no process group). Under
torchrun every collective is bounded by a timeout (``init_from_env(timeout_s=...)``, default
:data:`DEFAULT_TIMEOUT_S`): a rank that freezes or dies makes the others raise
:class:`DistTimeoutError` instead of waiting forever.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from easier.errors import ConfigError, EasierError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "DistTimeoutError",
    "barrier",
    "cleanup",
    "comm_device",
    "get_info",
    "init_from_env",
    "is_main",
    "live",
    "main_only",
    "timed_out",
]

T = TypeVar("T")

# How long a collective waits for the other ranks before every rank gives up. Long enough for a
# slow rank that is still working (an entropy pass on a big shard, a checkpoint on a slow disk),
# short enough that a frozen rank does not hold the others for hours.
DEFAULT_TIMEOUT_S = 900.0


class DistTimeoutError(EasierError):
    """A collective waited longer than the process-group timeout: another rank froze or died."""


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
    DistInfo without re-initialising. ``timeout_s`` bounds how long every collective waits
    for the other ranks (default :data:`DEFAULT_TIMEOUT_S`).
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
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if not timeout > 0 or timeout != timeout or timeout == float("inf"):
        raise ConfigError(f"timeout_s={timeout_s!r}: must be a finite number of seconds > 0")
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout),
    )
    return info


def live() -> bool:
    """Whether a process group is initialised (False in a single process)."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if not live():
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
    if live():
        gc.collect()  # free dropped DDP wrappers, whose reference cycles hold the group
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 and in a single process: the one process that writes files."""
    return not live() or dist.get_rank() == 0


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only; other ranks get None without waiting.

    Follow it with :func:`barrier` when other ranks read what rank 0 wrote.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (raised by a collective) means the process-group timeout expired, or a
    peer's connection broke: both mean another rank froze or died."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("timed out", "timeout", "connection reset", "connection closed",
                            "broken pipe", "peer closed"))
