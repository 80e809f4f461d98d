"""Decide, chain by chain, whether merging pays, and record it as a FoldPlan.

Merging is exact but not free: two 3x3 convs (C->C->C) cost 18·C² MACs per pixel, the merged
5x5 costs 25·C² (+39 %), while a MobileNetV2 inverted residual (pw 6x -> dw3x3 -> pw) costs
12·C² + 54·C unmerged and 9·C² merged. So each candidate chain gets a decision from a *mode*:

* ``"latency"`` (default): time the unmerged chain against the merged layer at the chain's real
  input shape, at each batch size the plan must hold for (:class:`~.latency.LatencyConfig`:
  paired interleaved rounds, a noise band). Merge when the merged layer is faster beyond the
  noise and ``margin`` at every size; keep it when it is slower at any; when the timing is
  inconclusive, fall back to the FLOPs rule and say so. Then the whole folded model is timed
  against the BN-folded-only model at each size; if it is slower at any, every merge is dropped.
  Chains with the same layers and shapes are timed once and get the same decision.
* ``"flops"``: merge when FLOPs do not grow.
* ``"all"``: merge every exactly mergeable chain.
* ``"none"``: merge nothing.

BN folding is done in every mode: it is exact and removes work without adding any. A chain whose
later convs still pad (padding not relocated) is refused in every mode, since its merge would be
inexact at the borders. New modes are added with :func:`register_mode`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from easier.errors import ConfigError, DataError
from easier.graph.capture import call_model
from easier.merge.build import build_folded
from easier.merge.candidates import (
    Candidate,
    chain_flops,
    chain_signature,
    layer_flops,
    make_candidate,
)
from easier.merge.chains import PADDING_REASON, Chain, chain_is_exact, find_chains
from easier.merge.graph import node_shape, prepare
from easier.merge.latency import LatencyConfig, TimingJob, judge
from easier.merge.record import ChainDecision, FoldPlan
from easier.perf.timing import Comparison, example_batch, resize_batch

__all__ = [
    "MODES",
    "Candidate",
    "ChainDecision",
    "FoldPlan",
    "LatencyConfig",
    "chain_flops",
    "chain_signature",
    "layer_flops",
    "make_candidate",
    "plan_fold",
    "register_mode",
]


# ---------------------------------------------------------------------------------------------
# modes


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
    verdict, why = judge(c.time(), c.config.margin)
    if verdict != "inconclusive":
        return verdict == "faster", why
    c.inconclusive = True
    merge, flops_why = _decide_flops(c)
    return merge, f"{why}; FLOPs choice: {'merge' if merge else 'keep'} ({flops_why})"


# ---------------------------------------------------------------------------------------------
# the planner


def _undecided(gm: fx.GraphModule, chain: Chain) -> ChainDecision:
    return ChainDecision(
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


def _decision(gm: fx.GraphModule, chain: Chain, mode: _Mode, cfg: LatencyConfig,
              sizes: tuple[int, ...]) -> ChainDecision:
    d = _undecided(gm, chain)
    if not chain_is_exact(gm, chain):
        d.reason = PADDING_REASON
        return d
    cand = make_candidate(gm, chain, cfg, sizes)
    merged = cand.merged
    if chain.kind == "conv":
        d.kernel, d.stride = list(merged.kernel_size), list(merged.stride)
        d.padding, d.groups = list(merged.padding), merged.groups
    d.flops_after = cand.flops_after
    merge, d.reason = mode.decide(cand)
    d.decision = "merge" if merge else "keep"
    d.inconclusive = cand.inconclusive
    if cand.timings:
        first = cand.timings[sizes[0]]
        d.latency_before_ms, d.latency_after_ms = first.before_ms, first.after_ms
        d.timing = {str(b): c.to_dict() for b, c in cand.timings.items()}
    return d


def _copy_decision(d: ChainDecision, first: ChainDecision) -> None:
    """Give ``d`` the decision of an identical chain (same layers and shapes)."""
    for name in ("decision", "kernel", "stride", "padding", "groups", "flops_after",
                 "latency_before_ms", "latency_after_ms", "timing", "inconclusive"):
        setattr(d, name, getattr(first, name))
    d.reason = f"{first.reason} (as chain {first.chain_id}: same layers and shapes)"
    d.same_as = first.chain_id


def _config(latency: LatencyConfig | None, **overrides: Any) -> LatencyConfig:
    cfg = latency or LatencyConfig()
    given = {k: (tuple(v) if k == "batch_sizes" else v) for k, v in overrides.items()
             if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg


def plan_fold(
    model: nn.Module,
    example_input: Any,
    mode: str = "latency",
    *,
    batch_sizes: Sequence[int] | None = None,
    latency: LatencyConfig | None = None,
    min_run_time: float | None = None,
    margin: float | None = None,
    memo: dict[str, ChainDecision] | None = None,
) -> FoldPlan:
    """Return the FoldPlan that :func:`easier.fold` would apply to ``model`` in ``mode``.

    The "latency" mode times with ``latency`` (a :class:`LatencyConfig`); ``batch_sizes``,
    ``min_run_time`` (seconds per timed callable) and ``margin`` override its fields. The plan
    records the batch sizes it was timed for. ``model`` is not modified. ``memo`` (a dict kept
    by the caller, used with one mode and config) carries chain decisions across calls: a chain
    with the layers and shapes of one decided before is not timed again (folding every iteration
    of a run).
    """
    if mode not in MODES:
        raise ConfigError(f"unknown fold plan mode {mode!r}; choose one of {sorted(MODES)}")
    how = MODES[mode]
    cfg = _config(latency, batch_sizes=batch_sizes, min_run_time=min_run_time, margin=margin)
    try:
        sizes = cfg.sizes(example_batch(example_input))
    except DataError:  # no batch dimension: only an explicit list can be timed
        sizes = cfg.batch_sizes or (1,)
    gm, bn_folded = prepare(model, example_input)
    plan = FoldPlan(mode=mode, bn_folded=bn_folded, num_threads=torch.get_num_threads())
    decided: dict[str, ChainDecision] = {} if memo is None else memo
    for chain in find_chains(gm):
        sig = chain_signature(gm, chain)
        if sig in decided and chain_is_exact(gm, chain):
            d = _undecided(gm, chain)
            _copy_decision(d, decided[sig])
        else:
            d = _decision(gm, chain, how, cfg, sizes)
            if d.reason != PADDING_REASON:
                decided[sig] = d
        if chain.note:
            d.reason += f"; {chain.note}"
        plan.chains.append(d)
    if any(c.timing for c in plan.chains):
        plan.batch_sizes = list(sizes)
    if how.check_whole_model and plan.merged:
        _check_whole_model(model, example_input, gm, plan, cfg, sizes)
    return plan


def _check_whole_model(model: nn.Module, example_input: Any, bn_only: fx.GraphModule,
                       plan: FoldPlan, cfg: LatencyConfig, sizes: tuple[int, ...]) -> None:
    """Drop every merge when the folded model is slower than the BN-folded one at any size."""
    ex, inputs = example_input, {sizes[0]: example_input}  # no batch dimension: as it is
    try:
        if example_batch(example_input) == 1 and sizes != (1,):
            ex = resize_batch(example_input, 2)  # a one-sample capture would pin the batch size
            bn_only, _ = prepare(model, ex)
        inputs = {b: resize_batch(ex, b) for b in sizes}
    except DataError:
        pass
    folded = build_folded(model, ex, plan)
    timings: dict[int, Comparison] = {}
    for b, xb in inputs.items():
        job = TimingJob("model", b, cfg.rounds, max(2 * cfg.min_run_time, 0.05))
        try:
            timings[b] = cfg.compare(job, lambda xb=xb: call_model(bn_only, xb),
                                     lambda xb=xb: call_model(folded, xb))
        except Exception as exc:  # a capture that pinned its shapes cannot run at this size
            plan.notes.append(f"whole model not timed at batch {b} ({type(exc).__name__})")
    if not timings:
        return
    plan.batch_sizes = list(sizes)
    plan.whole_model = {str(b): c.to_dict() for b, c in timings.items()}
    first = next(iter(timings.values()))
    plan.whole_model_ms = {"bn_folded": first.before_ms, "folded": first.after_ms}
    verdict, why = judge(timings, 0.0, "the folded model (all merges)")
    if verdict == "slower":
        msg = f"dropped: {why}, against BN folding only"
        for c in plan.merged:
            c.decision, c.reason = "keep", f"{msg}; was: {c.reason}"
        plan.notes.append(f"all merges {msg}")
    elif verdict == "inconclusive":
        plan.notes.append(f"whole-model check: {why}; the per-chain decisions stand")
