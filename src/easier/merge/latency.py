"""How the "latency" fold plan times: named batch sizes, paired rounds, a noise band, a verdict.

A latency decision is only as good as its measurement. On a busy machine one timing of the
unmerged chain against one timing of the merged layer can come out 17x either way, so each
comparison here is *paired* (:func:`easier.perf.timing.paired_samples`: A/B rounds, order rotated)
and
judged on the quartile band of its per-round ratios (:class:`easier.perf.timing.Comparison`). A
chain
is merged when the merged layer is faster beyond the band at every batch size the user named;
kept when it is slower beyond the band at any; otherwise the timing is *inconclusive* and the
planner falls back to the FLOPs rule, saying so in the plan.

The timer is injectable (``LatencyConfig(timer=...)``) so that the planner can be tested with a
deterministic fake: it gets a :class:`TimingJob` (what is timed, at which batch size) and the
callables, and returns per-round milliseconds per callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from easier.errors import ConfigError
from easier.perf.timing import MIN_RUNS, Comparison, compare_samples, paired_samples

__all__ = ["LatencyConfig", "Timer", "TimingJob", "default_timer", "judge"]


@dataclass(frozen=True)
class TimingJob:
    """One paired timing the planner asks for: a chain (unmerged, merged) or the whole model
    (BN-folded only, folded), at one batch size."""

    what: str  # "chain" or "model"
    batch_size: int
    rounds: int
    min_run_time: float  # seconds per callable, all rounds together
    chain_id: int | None = None
    signature: str = ""  # chains with equal signatures time alike (same layer shapes)


Timer = Callable[[TimingJob, Sequence[Callable[[], Any]]], Sequence[Sequence[float]]]


def default_timer(job: TimingJob, fns: Sequence[Callable[[], Any]]) -> list[list[float]]:
    """Real wall-clock timing: interleaved rounds, the current thread count."""
    return paired_samples(fns, rounds=job.rounds, min_run_time=job.min_run_time)


@dataclass(frozen=True)
class LatencyConfig:
    """Settings of the "latency" plan.

    ``batch_sizes``: the sizes the plan must hold for (a chain is merged only if no named size
    gets slower); None means the example input's batch size. ``rounds`` paired rounds per
    comparison, ``min_run_time`` seconds per timed callable, ``margin`` how much faster (beyond
    the noise band) a merged chain must be to count as faster. ``timer`` replaces the
    wall-clock timer (tests).
    """

    batch_sizes: tuple[int, ...] | None = None
    rounds: int = 7
    min_run_time: float = 0.1
    margin: float = 0.03
    timer: Timer | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_sizes is not None:
            sizes = tuple(self.batch_sizes)
            if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                for b in sizes):
                raise ConfigError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
            object.__setattr__(self, "batch_sizes", tuple(dict.fromkeys(sizes)))
        if self.rounds < MIN_RUNS:
            raise ConfigError(f"rounds must be >= {MIN_RUNS} to estimate the noise, got "
                              f"{self.rounds}")
        if not self.min_run_time > 0:
            raise ConfigError(f"min_run_time must be > 0 seconds, got {self.min_run_time}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"margin must be in [0, 1), got {self.margin}")

    def sizes(self, example_batch: int) -> tuple[int, ...]:
        """The batch sizes to time at."""
        return self.batch_sizes or (example_batch,)

    def compare(self, job: TimingJob, before: Callable[[], Any],
                after: Callable[[], Any]) -> Comparison:
        """Time ``before`` and ``after`` as ``job`` says; the paired comparison."""
        samples = (self.timer or default_timer)(job, [before, after])
        if len(samples) != 2:
            raise ConfigError(f"a timer must return two sample lists, got {len(samples)}")
        return compare_samples(list(samples[0]), list(samples[1]))


def judge(timings: dict[int, Comparison], margin: float,
          subject: str = "merged") -> tuple[str, str]:
    """("faster" | "slower" | "inconclusive", why) over every timed batch size.

    Slower at any size wins (a merge must not cost anyone); faster needs every size.
    """
    verdicts = {b: c.verdict(margin) for b, c in timings.items()}

    def at(kind: str) -> str:
        return "; ".join(f"batch {b}: {timings[b].describe()}"
                         for b, v in verdicts.items() if v == kind)

    if "slower" in verdicts.values():
        return "slower", f"{subject} is slower at {at('slower')}"
    if all(v == "faster" for v in verdicts.values()):
        return "faster", f"{subject} is faster at {at('faster')}"
    return "inconclusive", (f"timing inconclusive (difference inside the noise or the "
                            f"{margin:.0%} margin) at {at('inconclusive')}")
