"""Robust wall-clock timing of callables, side by side (these machines are noisy)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.benchmark as benchmark

from .errors import ConfigError

__all__ = ["time_call", "time_side_by_side"]


def _timer(fn: Callable[[], Any]) -> benchmark.Timer:
    # the Timer defaults to one thread; time with what the caller has set
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def _stats(times: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(times, dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[1]), float(q[2] - q[0])


def time_call(
    fn: Callable[[], Any], *, min_run_time: float = 0.2, repeats: int = 1
) -> tuple[float, float, int]:
    """(median ms, IQR ms, number of timed blocks) of ``fn()`` under inference_mode.

    ``torch.utils.benchmark.Timer.blocked_autorange`` with the current thread count;
    ``repeats`` pools several autoranges (each re-estimates its block size, which bounds the
    damage one disturbed estimate can do on a busy machine).
    """
    if min_run_time <= 0 or repeats < 1:
        raise ConfigError(f"need min_run_time > 0 and repeats >= 1, got {min_run_time}, {repeats}")
    timer = _timer(fn)
    times: list[float] = []
    with torch.inference_mode():
        fn()  # warm-up outside the timed blocks (allocations, oneDNN primitive creation)
        for _ in range(repeats):
            times += timer.blocked_autorange(min_run_time=min_run_time / repeats).times
    return (*_stats(times), len(times))


def time_side_by_side(
    fns: Sequence[Callable[[], Any]], *, min_run_time: float = 0.2, rounds: int = 5
) -> list[tuple[float, float]]:
    """(median ms, IQR ms) of each function, timed in alternating rounds.

    Alternating spreads any change in machine load over all candidates alike, so their ratio is
    trustworthy even when the absolute times drift. ``min_run_time`` is per function in total.
    """
    if min_run_time <= 0 or rounds < 1:
        raise ConfigError(f"need min_run_time > 0 and rounds >= 1, got {min_run_time}, {rounds}")
    timers = [_timer(fn) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            fn()
        for _ in range(rounds):
            for timer, acc in zip(timers, times, strict=True):
                acc += timer.blocked_autorange(min_run_time=min_run_time / rounds).times
    return [_stats(t) for t in times]
