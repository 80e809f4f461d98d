"""Measure what a shallower network costs: params, FLOPs, latency, depth, activations left.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (aten level, FLOPs = 2·MACs; BN,
activations and adds count 0) at the example input's batch size. Latency is the median and IQR of
``torch.utils.benchmark.Timer`` runs in eval mode under ``torch.inference_mode()``, with the thread
count currently set (recorded). Depth is the number of weight layers on the longest input->output
path of the fx graph, so a residual block counts its longer branch, not both.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError, DataError, NoSitesError

__all__ = [
    "Latency",
    "Measurement",
    "compare_table",
    "measure",
    "time_call",
    "time_side_by_side",
    "weight_depth",
]

_WEIGHT_MODULES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
_WEIGHT_FNS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.linear,
    F.bilinear,
    torch.matmul,
    operator.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
}
_WEIGHT_METHODS = {"matmul", "mm", "bmm", "__matmul__"}


@dataclass(frozen=True)
class Latency:
    """Latency of one forward pass at one batch size, in milliseconds per batch."""

    batch_size: int
    median_ms: float
    iqr_ms: float
    runs: int


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


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _batch_size(args: Sequence[Any]) -> int:
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    raise DataError(
        "measure needs an example input with a batch dimension (a tensor, or a "
        "tuple whose first tensor has one)."
    )


def _resize_batch(args: Sequence[Any], batch: int, size: int) -> tuple[Any, ...]:
    """The example input with ``size`` samples, cycling through the example's own samples."""
    idx = torch.arange(size) % batch
    return tuple(
        a[idx.to(a.device)]
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch
        else a
        for a in args
    )


def _is_weight_node(gm: fx.GraphModule, node: fx.Node) -> int:
    """How many weight layers ``node`` applies in sequence (0 for none)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.MultiheadAttention):
            return 2  # input projection, then output projection
        return int(isinstance(mod, _WEIGHT_MODULES))
    has_param = any(a.op == "get_attr" for a in node.all_input_nodes)
    if node.op == "call_function" and node.target in _WEIGHT_FNS:
        return int(has_param)
    if node.op == "call_method" and node.target in _WEIGHT_METHODS:
        return int(has_param)
    return 0


def weight_depth(model: nn.Module) -> tuple[int, bool]:
    """(weight layers on the longest input->output path, exact?).

    Untraceable models fall back to counting conv/linear modules (not exact: parallel branches
    are summed).
    """
    try:
        gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    except Exception:  # fx raises many types; the fallback is flagged, not hidden
        return sum(isinstance(m, _WEIGHT_MODULES) for m in model.modules()), False
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        before = max((depth[a] for a in node.all_input_nodes), default=0)
        depth[node] = before + _is_weight_node(gm, node)
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    return (depth[outputs[0]] if outputs else 0), True


def _activations(model: nn.Module, example_input: Any) -> int | None:
    try:
        from .sites import find_sites
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
    args = _as_args(example_input)
    batch = _batch_size(args)
    if latency and (not batch_sizes or any(int(b) < 1 for b in batch_sizes)):
        raise ConfigError(f"batch_sizes must be positive integers, got {batch_sizes}")
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
        flops = int(counter.get_total_flops())
        lats = []
        if latency:
            for b in batch_sizes:
                batch_args = _resize_batch(args, batch, int(b))
                med, iqr, runs = time_call(
                    lambda a=batch_args: model(*a), min_run_time=min_run_time, repeats=repeats
                )
                lats.append(Latency(int(b), med, iqr, runs))
    finally:
        for m, t in flags.items():
            m.training = t
    depth, exact = weight_depth(model)
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
        show = [f"{x.median_ms:.3g} ± {x.iqr_ms:.2g}" if x else "–" for x in lat]
        ratio = _ratio(*(x.median_ms if x else None for x in lat))
        rows.append(f"| latency ms, batch {b} (median ± IQR) | {show[0]} | {show[1]} | {ratio} |")
    threads = {before.num_threads, after.num_threads}
    rows.append(f"\nthreads: {', '.join(map(str, sorted(threads)))}")
    return "\n".join(rows)
