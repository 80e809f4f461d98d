"""Measure what a shallower network costs: params, FLOPs, latency, depth, activations left.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (aten level, FLOPs = 2·MACs; BN,
activations and adds count 0) at the example input's batch size. Latency is the median and IQR of
``torch.utils.benchmark.Timer`` runs (at least ``timing.MIN_RUNS`` of them) in eval mode under
``torch.inference_mode()``, with the thread count currently set (recorded); a latency whose spread
is wide or whose runs are few is flagged ``noisy`` and warned about (:class:`EasierWarning`).
Depth is the number of weight layers on the longest input->output path of the ``torch.export``
capture, so a residual block counts its longer branch, not both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from easier.errors import ConfigError, NoSitesError, TraceError
from easier.graph.capture import call_model, capture
from easier.graph.sites import EasierWarning
from easier.perf.timing import (
    Comparison,
    compare_samples,
    example_batch,
    paired_samples,
    resize_batch,
    spread_problem,
    time_call,
    time_side_by_side,
)

__all__ = [
    "Latency",
    "Measurement",
    "compare_table",
    "measure",
    "measure_pair",
    "time_call",
    "time_side_by_side",
    "weight_depth",
]

_WEIGHT_MODULES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)


@dataclass(frozen=True)
class Latency:
    """Latency of one forward pass at one batch size, in milliseconds per batch."""

    batch_size: int
    median_ms: float
    iqr_ms: float
    runs: int
    noisy: bool = False  # too few runs or too wide a spread (a warning was given)


@dataclass(frozen=True)
class Measurement:
    """What a model costs at one input size (see :func:`measure`)."""

    params: int
    flops: int  # at the example input's batch size
    macs: int
    batch_size: int
    flops_per_sample: float
    depth: int
    depth_exact: bool
    activations: int | None
    num_threads: int
    latency: tuple[Latency, ...] = field(default_factory=tuple)

    def latency_ms(self, batch_size: int) -> float | None:
        """Median latency at ``batch_size`` (None when not measured)."""
        return next((lat.median_ms for lat in self.latency if lat.batch_size == batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency"] = [asdict(lat) for lat in self.latency]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        d = dict(d)
        d["latency"] = tuple(Latency(**lat) for lat in d.get("latency", ()))
        return cls(**d)


_WEIGHT_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
               "conv_transpose2d", "conv_transpose3d", "linear", "addmm", "mm", "matmul", "bmm",
               "baddbmm", "bilinear", "einsum"}


def _weight_layers(gm: fx.GraphModule, node: fx.Node) -> int:
    """How many weight layers ``node`` applies in sequence (0 for none)."""
    if node.op == "call_module":
        return int(isinstance(gm.get_submodule(str(node.target)), _WEIGHT_MODULES))
    if node.op != "call_function":
        return 0
    op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return int(op in _WEIGHT_OPS and any(a.op == "get_attr" for a in node.all_input_nodes))


def weight_depth(model: nn.Module, example_input: Any = None) -> tuple[int, bool]:
    """(weight layers on the longest input->output path, exact?).

    Read from a torch.export capture (an op with a parameter operand is a weight layer). A model
    that cannot be captured falls back to counting conv/linear modules (not exact: parallel
    branches are summed).
    """
    try:
        gm = capture(model, example_input).gm
    except TraceError:  # the fallback is flagged, not hidden
        return sum(isinstance(m, _WEIGHT_MODULES) for m in model.modules()), False
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        before = max((depth[a] for a in node.all_input_nodes), default=0)
        depth[node] = before + _weight_layers(gm, node)
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    return (depth[outputs[0]] if outputs else 0), True


def _activations(model: nn.Module, example_input: Any) -> int | None:
    try:
        from easier.graph.sites import find_sites
    except ImportError:  # the sites step is optional for measuring
        return None
    try:
        return len(find_sites(model, example_input))
    except NoSitesError:
        return 0


def measure(
    model: nn.Module,
    example_input: Any,
    *,
    batch_sizes: Sequence[int] = (1,),
    latency: bool = True,
    min_run_time: float = 0.2,
    repeats: int = 1,
) -> Measurement:
    """Return params, FLOPs/MACs, latency per batch size, depth and activation count of a model.

    FLOPs are counted once at the example input's batch size (``flops_per_sample`` divides by
    it); latency is timed at each of ``batch_sizes`` by cycling the example's samples. The model
    runs in eval mode and its training flags are restored afterwards.
    """
    batch = example_batch(example_input)
    if latency and (not batch_sizes or any(int(b) < 1 for b in batch_sizes)):
        raise ConfigError(f"batch_sizes must be positive integers, got {batch_sizes}")
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, example_input)
        flops = int(counter.get_total_flops())
        lats = []
        if latency:
            for b in batch_sizes:
                batch_in = resize_batch(example_input, int(b))
                med, iqr, runs = time_call(
                    lambda a=batch_in: call_model(model, a), min_run_time=min_run_time,
                    repeats=repeats,
                )
                problem = spread_problem(med, iqr, runs)
                if problem:
                    warnings.warn(f"latency of {type(model).__name__} at batch {b} "
                                  f"({med:.3g} ms) is not reliable: {problem}; measure on a "
                                  "quieter machine or with a longer min_run_time",
                                  EasierWarning, stacklevel=2)
                lats.append(Latency(int(b), med, iqr, runs, noisy=problem is not None))
    finally:
        for m, t in flags.items():
            m.training = t
    depth, exact = weight_depth(model, example_input)
    return Measurement(
        params=sum(p.numel() for p in model.parameters()),
        flops=flops,
        macs=flops // 2,
        batch_size=batch,
        flops_per_sample=flops / batch,
        depth=depth,
        depth_exact=exact,
        activations=_activations(model, example_input),
        num_threads=torch.get_num_threads(),
        latency=tuple(lats),
    )


def measure_pair(
    before: nn.Module, after: nn.Module, example_input: Any, *,
    batch_sizes: Sequence[int] = (1,), rounds: int = 9, min_run_time: float = 0.4,
) -> tuple[Measurement, Measurement, dict[int, Comparison]]:
    """:func:`measure` of two models whose latencies are timed side by side, round by round.

    Timing one model and then the other lets a change in machine load between the two read as
    a speedup (or a slowdown); interleaved rounds share it. Returns both measurements (each
    latency is the median and IQR of that model's rounds, flagged noisy as :func:`measure` does)
    and, per batch size, the paired :class:`~easier.perf.timing.Comparison`: the per-round ratio
    after/before and its sign-test noise band, which says whether the change is real.
    """
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch_sizes must be positive integers, got {batch_sizes}")
    m_before = measure(before, example_input, latency=False)
    m_after = measure(after, example_input, latency=False)
    models = (before, after)
    flags = {m: m.training for model in models for m in model.modules()}
    lats: tuple[list[Latency], list[Latency]] = ([], [])
    paired: dict[int, Comparison] = {}
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            for b in batch_sizes:
                batch_in = resize_batch(example_input, int(b))
                samples = paired_samples(
                    [lambda m=model, a=batch_in: call_model(m, a) for model in models],
                    rounds=rounds, min_run_time=min_run_time)
                cmp = compare_samples(*samples)
                paired[int(b)] = cmp
                for side, (med, iqr) in enumerate(((cmp.before_ms, cmp.before_iqr_ms),
                                                   (cmp.after_ms, cmp.after_iqr_ms))):
                    problem = spread_problem(med, iqr, cmp.runs)
                    lats[side].append(Latency(int(b), med, iqr, cmp.runs,
                                              noisy=problem is not None))
    finally:
        for m, t in flags.items():
            m.training = t
    return (replace(m_before, latency=tuple(lats[0])), replace(m_after, latency=tuple(lats[1])),
            paired)


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.4g}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.3g}" if a and b is not None else "–"


def compare_table(before: Measurement, after: Measurement) -> str:
    """A markdown table of two measurements with an after/before ratio column."""
    rows = [("| metric | before | after | after/before |"), "|---|---:|---:|---:|"]

    def add(name: str, a: float | None, b: float | None, fmt: Callable[[Any], str]) -> None:
        show = [fmt(v) if v is not None else "–" for v in (a, b)]
        rows.append(f"| {name} | {show[0]} | {show[1]} | {_ratio(a, b)} |")

    exact = "" if before.depth_exact and after.depth_exact else " (module count, not exact)"
    add(f"depth (weight layers on longest path){exact}", before.depth, after.depth, str)
    add("activations", before.activations, after.activations, str)
    add("params", before.params, after.params, _human)
    add("FLOPs per sample (2·MACs)", before.flops_per_sample, after.flops_per_sample, _human)
    add("MACs per sample", before.flops_per_sample / 2, after.flops_per_sample / 2, _human)
    sizes = sorted({lat.batch_size for m in (before, after) for lat in m.latency})
    for b in sizes:
        lat = [next((x for x in m.latency if x.batch_size == b), None) for m in (before, after)]
        show = [f"{x.median_ms:.3g} ± {x.iqr_ms:.2g}{' (noisy)' if x.noisy else ''}" if x else "–"
                for x in lat]
        ratio = _ratio(*(x.median_ms if x else None for x in lat))
        rows.append(f"| latency ms, batch {b} (median ± IQR) | {show[0]} | {show[1]} | {ratio} |")
    threads = {before.num_threads, after.num_threads}
    rows.append(f"\nthreads: {', '.join(map(str, sorted(threads)))}")
    return "\n".join(rows)
