"""Decide, chain by chain, whether merging pays, and record it as a FoldPlan.

Merging is exact but not free: two 3x3 convs (C->C->C) cost 18·C² MACs per pixel, the merged
5x5 costs 25·C² (+39 %), while a MobileNetV2 inverted residual (pw 6x -> dw3x3 -> pw) costs
12·C² + 54·C unmerged and 9·C² merged. So each candidate chain gets a decision from a *mode*:

* ``"latency"`` (default): time the unmerged chain and the merged layer at the chain's real input
  shape (``torch.utils.benchmark.Timer``, current thread count) and merge when the merged layer
  is faster by more than ``margin``. Then the whole folded model is timed side by side with the
  BN-folded-only model; if it is slower, every merge is dropped and the plan says so.
* ``"flops"``: merge when FLOPs do not grow.
* ``"all"``: merge every exactly mergeable chain.
* ``"none"``: merge nothing.

BN folding is done in every mode: it is exact and removes work without adding any. A chain whose
later convs still pad (padding not relocated) is refused in every mode, since its merge would be
inexact at the borders. New modes are added with :func:`register_mode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..capture import call_model
from ..errors import ConfigError
from ..timing import time_side_by_side
from .build import build_folded
from .chains import PADDING_REASON, Chain, chain_is_exact, find_chains
from .graph import node_shape, prepare
from .merge import merge_chain

__all__ = [
    "MODES",
    "Candidate",
    "ChainDecision",
    "FoldPlan",
    "chain_flops",
    "layer_flops",
    "plan_fold",
    "register_mode",
]


@dataclass
class ChainDecision:
    """What the planner decided for one chain, and why."""

    chain_id: int
    kind: str  # "conv" or "linear"
    nodes: list[str]
    modules: list[str]
    residual: str | None  # "identity", the shortcut module's name, or None
    decision: str  # "merge" or "keep"
    reason: str
    input_shape: list[int] | None = None
    kernel: list[int] | None = None  # merged layer (conv chains)
    stride: list[int] | None = None
    padding: list[int] | None = None
    groups: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None


@dataclass
class FoldPlan:
    """The record of one fold: per-chain decisions, BN folds, and the verification error."""

    mode: str
    chains: list[ChainDecision] = field(default_factory=list)
    bn_folded: list[str] = field(default_factory=list)  # "layer<-bn"
    max_abs_error: float | None = None
    num_threads: int | None = None
    whole_model_ms: dict[str, float] | None = None  # {"bn_folded": ..., "folded": ...}
    notes: list[str] = field(default_factory=list)

    @property
    def merged(self) -> list[ChainDecision]:
        return [c for c in self.chains if c.decision == "merge"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FoldPlan:
        try:
            d = dict(d)
            d["chains"] = [ChainDecision(**c) for c in d.get("chains", [])]
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(
                f"not a FoldPlan dictionary ({exc}); load one written by FoldPlan.to_dict()."
            ) from exc

    def __str__(self) -> str:
        err = "not verified" if self.max_abs_error is None else f"{self.max_abs_error:.2g}"
        head = (
            f"FoldPlan mode={self.mode} threads={self.num_threads}: "
            f"{len(self.merged)}/{len(self.chains)} chains merged, "
            f"{len(self.bn_folded)} BN folded, max |err| {err}"
        )
        if self.whole_model_ms:
            head += (
                f"; whole model {self.whole_model_ms['bn_folded']:.3g} ms (BN folded) vs "
                f"{self.whole_model_ms['folded']:.3g} ms (folded)"
            )
        cols = [
            "id",
            "kind",
            "layers",
            "residual",
            "merged k/s/p",
            "decision",
            "FLOPs",
            "ms",
            "reason",
        ]
        rows = [cols] + [_row(c) for c in self.chains]
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols) - 1)]
        lines = [head]
        for r in rows:
            lines.append("  ".join([*(v.ljust(w) for v, w in zip(r, widths, strict=False)), r[-1]]))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.4g}"


def _row(c: ChainDecision) -> list[str]:
    geo = "–"
    if c.kernel is not None:
        geo = "/".join("x".join(map(str, v)) for v in (c.kernel, c.stride, c.padding))
    flops = "–" if c.flops_before is None else _human(c.flops_before)
    if c.flops_after is not None:
        flops += f"->{_human(c.flops_after)}"
    ms = "–"
    if c.latency_before_ms is not None and c.latency_after_ms is not None:
        ms = f"{c.latency_before_ms:.3g}->{c.latency_after_ms:.3g}"
    return [
        str(c.chain_id),
        c.kind,
        ">".join(c.modules),
        c.residual or "–",
        geo,
        c.decision,
        flops,
        ms,
        c.reason,
    ]


# ---------------------------------------------------------------------------------------------
# costs


def layer_flops(module: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Forward FLOPs (2·MACs) of a conv or linear layer producing ``out_shape``.

    Matches ``FlopCounterMode``: bias and elementwise work are not counted.
    """
    if isinstance(module, nn.Linear):
        return 2 * math.prod(out_shape[:-1]) * module.in_features * module.out_features
    n = len(module.kernel_size)
    batch = math.prod(out_shape[: -n - 1])
    per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return 2 * batch * module.out_channels * per_out * math.prod(out_shape[-n:])


def chain_flops(gm: fx.GraphModule, chain: Chain) -> int:
    """FLOPs of a chain as it runs unmerged (shapes from the prepared graph)."""
    nodes = chain.nodes + ([chain.shortcut] if chain.shortcut is not None else [])
    return sum(layer_flops(gm.get_submodule(str(n.target)), node_shape(n)) for n in nodes)


class _ChainRunner(nn.Module):
    """The unmerged chain as a module, for timing it on its own."""

    def __init__(
        self, layers: list[nn.Module], residual: str | None, shortcut: nn.Module | None
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.residual, self.shortcut = residual, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.layers:
            y = layer(y)
        if self.shortcut is not None:
            return y + self.shortcut(x)
        return y + x if self.residual == "identity" else y


# ---------------------------------------------------------------------------------------------
# modes


@dataclass
class Candidate:
    """One exactly mergeable chain, as a mode sees it. ``time()`` measures on first call."""

    chain: Chain
    flops_before: int
    flops_after: int
    unmerged: nn.Module
    merged: nn.Module
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    min_run_time: float
    margin: float
    latency_ms: tuple[float, float] | None = None

    def time(self) -> tuple[float, float]:
        """(unmerged ms, merged ms) at the chain's real input shape."""
        if self.latency_ms is None:
            device = next(self.merged.parameters()).device
            x = torch.randn(self.input_shape, dtype=self.dtype, device=device)
            (before, _), (after, _) = time_side_by_side(
                [lambda: self.unmerged(x), lambda: self.merged(x)], min_run_time=self.min_run_time
            )
            self.latency_ms = (before, after)
        return self.latency_ms


Decide = Callable[[Candidate], tuple[bool, str]]


@dataclass(frozen=True)
class _Mode:
    decide: Decide
    check_whole_model: bool


MODES: dict[str, _Mode] = {}


def register_mode(name: str, *, check_whole_model: bool = False) -> Callable[[Decide], Decide]:
    """Register ``decide(candidate) -> (merge?, reason)`` as planner mode ``name``.

    ``check_whole_model`` makes the planner time the folded model against the BN-folded one and
    drop all merges when the folded one is slower.
    """

    def wrap(fn: Decide) -> Decide:
        MODES[name] = _Mode(fn, check_whole_model)
        return fn

    return wrap


@register_mode("none")
def _decide_none(c: Candidate) -> tuple[bool, str]:
    return False, "mode 'none': BN folding only"


@register_mode("all")
def _decide_all(c: Candidate) -> tuple[bool, str]:
    return True, "mode 'all'"


def _pct(before: float, after: float) -> str:
    return f"{100 * (after / before - 1):+.0f}%" if before else "n/a"


@register_mode("flops")
def _decide_flops(c: Candidate) -> tuple[bool, str]:
    change = _pct(c.flops_before, c.flops_after)
    if c.flops_after <= c.flops_before:
        return True, f"FLOPs do not grow ({change})"
    return False, f"merging adds FLOPs ({change})"


@register_mode("latency", check_whole_model=True)
def _decide_latency(c: Candidate) -> tuple[bool, str]:
    before, after = c.time()
    change = _pct(before, after)
    if after < before * (1 - c.margin):
        return True, f"merged is faster ({change} latency)"
    return False, f"merged not faster by > {c.margin:.0%} ({change} latency)"


# ---------------------------------------------------------------------------------------------
# the planner


def _decision(
    gm: fx.GraphModule, chain: Chain, mode: _Mode, *, min_run_time: float, margin: float
) -> ChainDecision:
    d = ChainDecision(
        chain_id=chain.id,
        kind=chain.kind,
        nodes=[n.name for n in chain.nodes],
        modules=chain.modules,
        residual=chain.residual,
        decision="keep",
        reason="",
        input_shape=list(node_shape(chain.input) or []) or None,
        flops_before=chain_flops(gm, chain),
    )
    if not chain_is_exact(gm, chain):
        d.reason = PADDING_REASON
    else:
        merged = merge_chain(gm, chain)
        if chain.kind == "conv":
            d.kernel, d.stride = list(merged.kernel_size), list(merged.stride)
            d.padding, d.groups = list(merged.padding), merged.groups
        d.flops_after = layer_flops(merged, node_shape(chain.end))
        shortcut = gm.get_submodule(str(chain.shortcut.target)) if chain.shortcut else None
        cand = Candidate(
            chain=chain,
            flops_before=d.flops_before,
            flops_after=d.flops_after,
            unmerged=_ChainRunner(
                [gm.get_submodule(m) for m in chain.modules], chain.residual, shortcut
            ),
            merged=merged,
            input_shape=node_shape(chain.input),
            dtype=merged.weight.dtype,
            min_run_time=min_run_time,
            margin=margin,
        )
        merge, d.reason = mode.decide(cand)
        d.decision = "merge" if merge else "keep"
        if cand.latency_ms is not None:
            d.latency_before_ms, d.latency_after_ms = cand.latency_ms
    if chain.note:
        d.reason += f"; {chain.note}"
    return d


def plan_fold(
    model: nn.Module,
    example_input: Any,
    mode: str = "latency",
    *,
    min_run_time: float = 0.1,
    margin: float = 0.03,
) -> FoldPlan:
    """Return the FoldPlan that :func:`easier.fold` would apply to ``model`` in ``mode``.

    ``min_run_time`` (seconds) is spent per timed layer (twice per chain) in "latency" mode, and
    ``margin`` is how much faster a merged layer must be to be chosen. ``model`` is not modified.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown fold plan mode {mode!r}; choose one of {sorted(MODES)}")
    how = MODES[mode]
    gm, bn_folded = prepare(model, example_input)
    plan = FoldPlan(mode=mode, bn_folded=bn_folded, num_threads=torch.get_num_threads())
    plan.chains = [
        _decision(gm, c, how, min_run_time=min_run_time, margin=margin) for c in find_chains(gm)
    ]
    if how.check_whole_model and plan.merged:
        _check_whole_model(model, example_input, gm, plan, min_run_time)
    return plan


def _check_whole_model(
    model: nn.Module,
    example_input: Any,
    bn_only: fx.GraphModule,
    plan: FoldPlan,
    min_run_time: float,
) -> None:
    """Drop every merge when the folded model is slower than the BN-folded one."""
    folded = build_folded(model, example_input, plan)
    (base, _), (new, _) = time_side_by_side(
        [lambda: call_model(bn_only, example_input),
         lambda: call_model(folded, example_input)], min_run_time=max(2 * min_run_time, 0.05)
    )
    plan.whole_model_ms = {"bn_folded": base, "folded": new}
    if new > base:
        msg = (
            f"dropped: whole model with merges was slower ({new:.3g} ms vs {base:.3g} ms "
            "BN-folded only)"
        )
        for c in plan.merged:
            c.decision, c.reason = "keep", f"{msg}; was: {c.reason}"
        plan.notes.append(f"all merges {msg}")
