"""Robust wall-clock timing of callables, side by side (these machines are noisy).

Two rules make a latency worth reporting: enough runs (:data:`MIN_RUNS` at least, never one
block), and a spread that is reported with it. Comparisons of two variants are *paired*: the
variants are timed in alternating rounds (A/B/B/A…, order rotated), the per-round ratio after/before
is taken, and the spread of those ratios gives a noise band for their median; a difference
inside the band is not claimed (:meth:`Comparison.verdict`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils.benchmark as benchmark
from torch.utils import _pytree as pytree

from easier.errors import ConfigError, DataError

__all__ = [
    "MIN_RUNS",
    "SPREAD_WARN",
    "Comparison",
    "compare_samples",
    "example_batch",
    "paired_samples",
    "resize_batch",
    "spread_problem",
    "time_call",
    "time_side_by_side",
]

MIN_RUNS = 5  # fewer timed runs than this and a median says little
SPREAD_WARN = 0.25  # an IQR above this fraction of the median makes a latency untrustworthy


def _timer(fn: Callable[[], Any]) -> benchmark.Timer:
    # the Timer defaults to one thread; time with what the caller has set
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); with fewer than 4 values the band is (min, max), which is wider."""
    s = sorted(xs)
    if len(s) < 4:
        return s[0], statistics.median(s), s[-1]
    q1, med, q3 = statistics.quantiles(s, n=4, method="inclusive")
    return q1, med, q3


def _stats(times: Sequence[float]) -> tuple[float, float]:
    q1, med, q3 = _quartiles([t * 1e3 for t in times])
    return med, q3 - q1


def spread_problem(median_ms: float, iqr_ms: float, runs: int) -> str | None:
    """Why a latency should not be trusted (too few runs, too wide a spread), or None."""
    if runs < MIN_RUNS:
        return f"it rests on {runs} timed run(s) (< {MIN_RUNS})"
    if median_ms > 0 and iqr_ms > SPREAD_WARN * median_ms:
        return (f"its spread (IQR {iqr_ms:.3g} ms) exceeds {SPREAD_WARN:.0%} of its median "
                f"({median_ms:.3g} ms): the machine was busy")
    return None


def time_call(
    fn: Callable[[], Any], *, min_run_time: float = 0.2, repeats: int = 1,
    min_runs: int = MIN_RUNS,
) -> tuple[float, float, int]:
    """(median ms, IQR ms, number of timed blocks) of ``fn()`` under inference_mode.

    ``torch.utils.benchmark.Timer.blocked_autorange`` with the current thread count; ``repeats``
    pools several autoranges (each re-estimates its block size, which bounds the damage one
    disturbed estimate can do on a busy machine). A slow ``fn`` gets more blocks until there are
    ``min_runs``, so a median never rests on one run.
    """
    if min_run_time <= 0 or repeats < 1 or min_runs < 1:
        raise ConfigError(f"need min_run_time > 0, repeats >= 1 and min_runs >= 1, got "
                          f"{min_run_time}, {repeats}, {min_runs}")
    timer = _timer(fn)
    times: list[float] = []
    number = 1
    with torch.inference_mode():
        fn()  # warm-up outside the timed blocks (allocations, oneDNN primitive creation)
        for _ in range(repeats):
            m = timer.blocked_autorange(min_run_time=min_run_time / repeats)
            times += m.times
            number = m.number_per_run
        while len(times) < min_runs:
            times += timer.timeit(number=number).times
    return (*_stats(times), len(times))


def time_side_by_side(
    fns: Sequence[Callable[[], Any]], *, min_run_time: float = 0.2, rounds: int = 5
) -> list[tuple[float, float]]:
    """(median ms, IQR ms) of each function, timed in alternating rounds.

    Alternating spreads any change in machine load over all candidates alike, so their ratio is
    trustworthy even when the absolute times drift. ``min_run_time`` is per function in total.
    """
    samples = paired_samples(fns, min_run_time=min_run_time, rounds=rounds)
    return [_stats([t / 1e3 for t in s]) for s in samples]


def paired_samples(
    fns: Sequence[Callable[[], Any]], *, rounds: int = 7, min_run_time: float = 0.1
) -> list[list[float]]:
    """Per-call ms of each function in each of ``rounds`` interleaved rounds.

    Each round times one block of every function (A/B, then B/A: the order rotates, so no
    function always runs right after another); a block is as many calls as fill
    ``min_run_time / rounds`` seconds, at least one. ``samples[i][r]`` is function i in round r.
    """
    if min_run_time <= 0 or rounds < 1 or not fns:
        raise ConfigError(f"need functions, min_run_time > 0 and rounds >= 1, got {len(fns)}, "
                          f"{min_run_time}, {rounds}")
    timers = [_timer(fn) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        numbers = []
        for fn, timer in zip(fns, timers, strict=True):
            fn()  # warm-up
            once = timer.timeit(number=1).mean
            numbers.append(max(1, math.ceil(min_run_time / rounds / max(once, 1e-7))))
        order = list(range(len(fns)))
        for r in range(rounds):
            shift = r % len(order)
            for i in order[shift:] + order[:shift]:
                samples[i].append(timers[i].timeit(number=numbers[i]).mean * 1e3)
    return samples


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of two variants (before, after) timed in the same rounds.

    ``ratio`` is the median of the per-round ratios after/before; ``ratio_lo``/``ratio_hi`` the
    noise band of that median: the distribution-free (sign-test) interval of order statistics
    of the ratios that covers the median with >= 95 % confidence, widened to min..max when
    there are too few rounds for that (up to 8 rounds it is min..max).
    """

    before_ms: float
    after_ms: float
    before_iqr_ms: float
    after_iqr_ms: float
    ratio: float
    ratio_lo: float
    ratio_hi: float
    runs: int

    def verdict(self, margin: float = 0.0) -> str:
        """"faster" when the whole band is below 1 - margin, "slower" when it is above 1,
        else "inconclusive" (the difference is inside the noise or the margin)."""
        if self.ratio_hi < 1 - margin:
            return "faster"
        if self.ratio_lo > 1:
            return "slower"
        return "inconclusive"

    def describe(self) -> str:
        """E.g. ``-25% (band -30..-20%, 7 runs)``."""
        def pct(r: float) -> str:
            return f"{100 * (r - 1):+.0f}%"
        return f"{pct(self.ratio)} (band {pct(self.ratio_lo)}..{pct(self.ratio_hi)}, " \
               f"{self.runs} runs)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _band_rank(n: int, alpha: float = 0.025) -> int:
    """Largest k with P(Binomial(n, 1/2) <= k) <= alpha (0 when none): sorted[k]..sorted[-1-k]
    then covers the median with probability >= 1 - 2·alpha (a sign-test interval)."""
    k, cdf = 0, 0.0
    for j in range(n):
        cdf += math.comb(n, j) / 2**n
        if cdf > alpha or j >= (n - 1) // 2:
            break
        k = j
    return k


def compare_samples(before: Sequence[float], after: Sequence[float]) -> Comparison:
    """The :class:`Comparison` of paired per-round times (same length, same rounds)."""
    if len(before) != len(after) or not before:
        raise ConfigError(f"paired samples need equal, non-zero lengths, got {len(before)} and "
                          f"{len(after)}")
    if any(not (math.isfinite(t) and t > 0) for t in (*before, *after)):
        raise ConfigError("timed samples must be positive, finite milliseconds")
    ratios = sorted(a / b for a, b in zip(after, before, strict=True))
    k = _band_rank(len(ratios))
    lo, ratio, hi = ratios[k], statistics.median(ratios), ratios[-1 - k]
    (b1, bm, b3), (a1, am, a3) = _quartiles(before), _quartiles(after)
    return Comparison(bm, am, b3 - b1, a3 - a1, ratio, lo, hi, len(before))


def example_batch(example_input: Any) -> int:
    """The batch size of a model input (the first dimension of its first tensor)."""
    for a in pytree.tree_leaves(example_input):
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    raise DataError(
        "timing needs an example input with a batch dimension (a tensor, or a tuple or dict "
        "whose first tensor has one)."
    )


def resize_batch(example_input: Any, size: int) -> Any:
    """The example input with ``size`` samples, cycling through the example's own samples."""
    batch = example_batch(example_input)
    idx = torch.arange(size) % batch
    return pytree.tree_map(
        lambda a: a[idx.to(a.device)]
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a,
        example_input,
    )
