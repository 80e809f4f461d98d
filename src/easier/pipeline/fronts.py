"""Accuracy against the measured latency (and FLOPs) of the folded model, one point per iteration.

A method's curve of accuracy against removed activations says little about what a practitioner
buys: a removal pays only through the fold it enables, and a fold pays only if the merged layer
runs faster on the target. So for a run that kept every iteration's model
(``RunConfig(keep_iterations=True)``), each iteration's model is folded with the run's plan and
timed against the *dense reference* (iteration 0, the trained dense model, folded the same way:
BN folding is free to anyone, so it is not credited to the method) in the same process, in
paired interleaved rounds (:func:`easier.perf.timing.paired_samples`); the per-round ratios give the
speed-up and its noise band (:class:`easier.perf.timing.Comparison`). Absolute milliseconds drift
with the machine's load; the paired ratio does not.

The timer is injectable (``FrontConfig(timer=...)``): it gets a :class:`PointJob` and the two
callables ``[dense, folded]`` and returns per-round milliseconds of each, like
:class:`easier.merge.LatencyConfig`'s timer.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easier.errors import ConfigError, FoldError, StateError
from easier.graph.capture import call_model
from easier.io.atomic import read_verified
from easier.io.records import (
    RunDir,
    atomic_write_text,
    load_iteration,
    lock_run_dir,
    saved_iterations,
)
from easier.merge import MODES, LatencyConfig, fold, plan_fold
from easier.perf.measure import measure
from easier.perf.timing import MIN_RUNS, Comparison, compare_samples, paired_samples, resize_batch

__all__ = ["FRONT_CSV", "FRONT_JSON", "Front", "FrontConfig", "FrontPoint", "PointJob",
           "fold_point", "front_csv", "front_run", "measure_front", "pareto_indices",
           "read_front", "wall_clock", "write_front"]

FRONT_CSV = "front.csv"
FRONT_JSON = "front.json"


@dataclass(frozen=True)
class PointJob:
    """One paired timing: the dense reference against iteration ``iteration``'s folded model."""

    iteration: int
    batch_size: int
    rounds: int
    min_run_time: float  # seconds per model, all rounds together


FrontTimer = Callable[[PointJob, Sequence[Callable[[], Any]]], Sequence[Sequence[float]]]


def wall_clock(job: PointJob, fns: Sequence[Callable[[], Any]]) -> list[list[float]]:
    """Real timing: interleaved rounds (order rotated), the current thread count."""
    return paired_samples(fns, rounds=job.rounds, min_run_time=job.min_run_time)


@dataclass(frozen=True)
class FrontConfig:
    """How each iteration's model is folded and timed.

    ``plan`` is the fold plan ("latency" as the run uses by default; "flops" or "all" skip the
    per-chain timing and are much cheaper); ``batch_sizes`` the sizes timed (and that the
    latency plan must hold for); ``rounds`` paired rounds per comparison, ``min_run_time``
    seconds per model and batch size. ``timer`` replaces the wall clock (tests); ``latency``
    the latency plan's own settings (default: plan for ``batch_sizes``).
    """

    plan: str = "latency"
    batch_sizes: tuple[int, ...] = (1,)
    rounds: int = 7
    min_run_time: float = 0.2
    timer: FrontTimer | None = field(default=None, compare=False, repr=False)
    latency: LatencyConfig | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.plan not in MODES:
            raise ConfigError(f"FrontConfig.plan={self.plan!r}: valid plans are {sorted(MODES)}")
        sizes = tuple(self.batch_sizes) if isinstance(self.batch_sizes, Sequence) else ()
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                            for b in sizes):
            raise ConfigError(f"FrontConfig.batch_sizes={self.batch_sizes!r}: must be positive "
                              "integers, e.g. (1, 64)")
        object.__setattr__(self, "batch_sizes", tuple(dict.fromkeys(sizes)))
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) \
                or self.rounds < MIN_RUNS:
            raise ConfigError(f"FrontConfig.rounds={self.rounds!r}: must be an integer >= "
                              f"{MIN_RUNS} to estimate the noise")
        if not self.min_run_time > 0:
            raise ConfigError(f"FrontConfig.min_run_time={self.min_run_time!r}: must be > 0 s")

    def fold_latency(self) -> LatencyConfig:
        return self.latency or LatencyConfig(batch_sizes=self.batch_sizes)


@dataclass(frozen=True)
class FrontPoint:
    """One iteration's model, folded: its accuracy, cost, and paired timing per batch size.

    ``timings[b]`` compares the dense reference (``before``) with this folded model
    (``after``); ``plan`` is the plan applied ("none" when the run's plan could not fold this
    model exactly, with ``note`` saying why).
    """

    iteration: int
    removed: int
    accepted: bool
    meets_threshold: bool
    val_acc: float
    test_acc: float | None
    flops: float  # per sample, folded model
    depth: int
    params: int
    merged: int  # chains merged by the fold
    fold_error: float | None
    plan: str
    timings: dict[int, Comparison]
    note: str | None = None

    @property
    def accuracy(self) -> float:
        """The accuracy a front is drawn with: test top-1 when the run has a test split."""
        return self.test_acc if self.test_acc is not None else self.val_acc

    def latency_ms(self, batch_size: int) -> float:
        return self.timings[batch_size].after_ms

    def speedup(self, batch_size: int) -> tuple[float, float, float]:
        """(speed-up over the dense reference, low, high end of its noise band)."""
        c = self.timings[batch_size]
        return 1 / c.ratio, 1 / c.ratio_hi, 1 / c.ratio_lo

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = {str(b): c.to_dict() for b, c in self.timings.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrontPoint:
        d = dict(d)
        d["timings"] = {int(b): Comparison(**c) for b, c in d["timings"].items()}
        return cls(**d)


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (accuracy, cost) pairs no other pair dominates, by increasing cost.

    A pair dominates another when its accuracy is >= and its cost <=, one of them strictly;
    equal pairs do not dominate each other. O(n log n): sweep by cost, keep the best accuracy.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front: list[int] = []
    best = float("-inf")  # best accuracy among strictly cheaper points
    i = 0
    while i < len(order):
        cost = points[order[i]][1]
        group = [j for j in order[i:] if points[j][1] == cost]
        top = points[group[0]][0]
        if top > best:
            front += [j for j in group if points[j][0] == top]
            best = top
        i += len(group)
    return front


@dataclass(frozen=True)
class Front:
    """The points of one run directory, and how they were measured."""

    points: tuple[FrontPoint, ...]
    plan: str
    batch_sizes: tuple[int, ...]
    num_threads: int
    machine: str
    missing: tuple[int, ...] = ()  # evaluated iterations whose model the run did not keep

    def pareto(self, by: str = "latency", batch_size: int | None = None) -> list[FrontPoint]:
        """The points no other beats on both accuracy and cost, by increasing cost.

        ``by="latency"``: the paired latency relative to the dense reference (folded / dense,
        the inverse speed-up) at ``batch_size`` (default the first timed): unlike absolute
        milliseconds, it does not drift with the machine's load between points. ``"flops"``:
        FLOPs per sample.
        """
        if by == "flops":
            costs = [p.flops for p in self.points]
        elif by == "latency":
            b = self.batch_sizes[0] if batch_size is None else batch_size
            costs = [p.timings[b].ratio for p in self.points]
        else:
            raise ConfigError(f"pareto by={by!r}: 'latency' or 'flops'")
        pairs = [(p.accuracy, c) for p, c in zip(self.points, costs, strict=True)]
        return [self.points[i] for i in pareto_indices(pairs)]

    def to_dict(self) -> dict[str, Any]:
        return {"format": "easier.front/1", "plan": self.plan,
                "batch_sizes": list(self.batch_sizes), "num_threads": self.num_threads,
                "machine": self.machine, "missing": list(self.missing),
                "dense_reference": "iteration 0 folded with the same plan",
                "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Front:
        return cls(tuple(FrontPoint.from_dict(p) for p in d["points"]), d["plan"],
                   tuple(d["batch_sizes"]), d["num_threads"], d["machine"],
                   tuple(d.get("missing", ())))


def fold_point(model: nn.Module, example: torch.Tensor, cfg: FrontConfig,
               memo: dict[str, Any] | None = None) -> tuple[nn.Module, str, str | None]:
    """The folded (and verified) model, the plan applied, and why it fell back to BN folding
    only (None when it did not). ``memo`` carries chain decisions between the points of a run,
    so each kind of chain is timed once (:func:`easier.merge.plan_fold`)."""
    try:
        plan = plan_fold(model, example, cfg.plan, latency=cfg.fold_latency(), memo=memo)
        return fold(model, example, plan=plan), cfg.plan, None
    except FoldError as exc:  # e.g. a run without fold_ready: its merges are inexact
        return fold(model, example, plan="none"), "none", f"plan {cfg.plan} failed: {exc}"


def _paired(cfg: FrontConfig, job: PointJob, dense: nn.Module, folded: nn.Module,
            x: torch.Tensor) -> Comparison:
    fns = [lambda: call_model(dense, x), lambda: call_model(folded, x)]
    samples = (cfg.timer or wall_clock)(job, fns)
    if len(samples) != 2:
        raise ConfigError(f"a front timer must return two sample lists, got {len(samples)}")
    return compare_samples(list(samples[0]), list(samples[1]))


def measure_front(run_dir: str | Path, config: FrontConfig | None = None, *,
                  model: nn.Module | None = None,
                  log: Callable[[str], None] | None = None) -> Front:
    """Fold every kept iteration of a run directory and time it against the dense reference.

    ``model`` is the dense base architecture for runs whose model is not from
    ``easier.models``. Iterations that failed (no model) are skipped; evaluated iterations the
    run did not keep are listed in ``Front.missing``. StateError when the dense one is missing.
    """
    cfg = config or FrontConfig()
    run = RunDir(run_dir)
    state = run.read_state()
    shape = run.read_config().get("input_shape")
    if state is None or not shape:
        raise StateError(f"{run.path} holds no completed iteration (or no input_shape): "
                         "nothing to draw a front from")
    kept = set(saved_iterations(run.path))
    if 0 not in kept:
        raise StateError(f"{run.path} kept no iteration models: rerun it with "
                         "RunConfig(keep_iterations=True) (easier compare --fronts does)")
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, *shape, generator=gen)  # batch 2: a one-sample capture pins it
    dense: nn.Module | None = None
    points, missing = [], []
    memo: dict[str, Any] = {}
    for h in state["history"]:
        k = int(h["iteration"])
        if h.get("failed"):
            continue
        if k not in kept:
            missing.append(k)
            continue
        reduced = load_iteration(run.path, k, model).model.eval()
        folded, plan, note = fold_point(reduced, example, cfg, memo)
        dense = folded if dense is None else dense
        cost = measure(folded, example, latency=False)
        timings = {b: _paired(cfg, PointJob(k, b, cfg.rounds, cfg.min_run_time), dense, folded,
                              resize_batch(example, b)) for b in cfg.batch_sizes}
        fold_plan = folded.fold_plan  # type: ignore[attr-defined]
        point = FrontPoint(k, len(h["removed"]), bool(h["accepted"]),
                           bool(h["meets_threshold"]), h["val_acc"], h.get("test_acc"),
                           cost.flops_per_sample, cost.depth, cost.params,
                           len(fold_plan.merged), fold_plan.max_abs_error, plan, timings, note)
        points.append(point)
        if log is not None:
            b = cfg.batch_sizes[0]
            s, lo, hi = point.speedup(b)
            log(f"front {run.path.name} iter {k}: {point.accuracy:.2f}% | "
                f"{point.latency_ms(b):.3g} ms at batch {b}, {s:.2f}x the dense "
                f"(band {lo:.2f}..{hi:.2f}) | {point.merged} merged")
    if missing and log is not None:
        log(f"front {run.path.name}: iterations {missing} were not kept (run without "
            "keep_iterations before a resume); they are not drawn")
    machine = (f"{platform.platform()} ({platform.processor() or platform.machine()}), "
               f"{os.cpu_count()} CPUs")
    return Front(tuple(points), cfg.plan, cfg.batch_sizes, torch.get_num_threads(), machine,
                 tuple(missing))


def front_csv(front: Front) -> str:
    """One row per point; per batch size B: dense and folded ms (median, IQR), the speed-up
    and its band, and whether the point is on the (relative) latency front; then the FLOPs
    front."""
    on = {b: {p.iteration for p in front.pareto("latency", b)} for b in front.batch_sizes}
    on_flops = {p.iteration for p in front.pareto("flops")}
    per_b = ("dense_ms", "dense_iqr_ms", "folded_ms", "folded_iqr_ms", "speedup",
             "speedup_lo", "speedup_hi", "pareto")
    head = ["iteration", "removed", "accepted", "meets_threshold", "val_acc", "test_acc",
            "flops", "depth", "params", "merged", "fold_error", "plan",
            *(f"{c}_b{b}" for b in front.batch_sizes for c in per_b), "pareto_flops", "note"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for p in front.points:
        row: list[Any] = [p.iteration, p.removed, p.accepted, p.meets_threshold, p.val_acc,
                          p.test_acc, p.flops, p.depth, p.params, p.merged, p.fold_error, p.plan]
        for b in front.batch_sizes:
            c = p.timings[b]
            row += [c.before_ms, c.before_iqr_ms, c.after_ms, c.after_iqr_ms, *p.speedup(b),
                    p.iteration in on[b]]
        w.writerow([*row, p.iteration in on_flops, p.note or ""])
    return buf.getvalue()


def write_front(run_dir: str | Path, front: Front) -> None:
    """front.json (everything, reloadable with :func:`read_front`) and front.csv, atomically."""
    run = RunDir(run_dir)
    run.write_json(FRONT_JSON, front.to_dict())
    atomic_write_text(run.file(FRONT_CSV), front_csv(front))


def read_front(run_dir: str | Path) -> Front:
    """The front a run directory holds (written by :func:`front_run`)."""
    return Front.from_dict(json.loads(read_verified(RunDir(run_dir).file(FRONT_JSON))))


def front_run(run_dir: str | Path, config: FrontConfig | None = None, *,
              model: nn.Module | None = None,
              log: Callable[[str], None] | None = None) -> Front:
    """:func:`measure_front` then :func:`write_front`, under the run directory's writer lock."""
    with lock_run_dir(run_dir):
        front = measure_front(run_dir, config, model=model, log=log)
        write_front(run_dir, front)
    return front

