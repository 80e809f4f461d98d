"""Fold linear layers that an activation removal made adjacent into fewer real layers, exactly.

Once an activation is gone, ``conv -> bn -> conv`` (or ``linear -> linear``) is one affine map
run as several layers. :func:`fold` works on the model's ``torch.export`` capture, lifted to layer
calls (:mod:`.graph`: BN and per-channel scales folded, identities dropped), finds *chains*
(:mod:`.chains`), decides per chain whether merging pays (:mod:`.plan`), merges them exactly
(:mod:`.merge`), verifies the result numerically against the original model and says what it did
in a :class:`FoldPlan`. Zero padding between convs makes a merge inexact at the borders; see
:mod:`easier.padding` (``linearize(..., fold_ready=True)``) for the remedy applied at removal time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from easier.errors import ConfigError, FoldError
from easier.merge.algebra import apply_merges, merge_chain
from easier.merge.build import build_folded
from easier.merge.chains import Chain, chain_is_exact, find_chains
from easier.merge.graph import prepare
from easier.merge.latency import LatencyConfig, TimingJob
from easier.merge.plan import (
    MODES,
    chain_flops,
    chain_signature,
    layer_flops,
    plan_fold,
    register_mode,
)
from easier.merge.record import ChainDecision, FoldPlan
from easier.merge.verify import explain_float64, judge_outputs, random_like

__all__ = [
    "MODES",
    "Chain",
    "ChainDecision",
    "FoldPlan",
    "LatencyConfig",
    "TimingJob",
    "apply_merges",
    "build_folded",
    "chain_flops",
    "chain_is_exact",
    "chain_signature",
    "find_chains",
    "fold",
    "layer_flops",
    "merge_chain",
    "plan_fold",
    "prepare",
    "register_mode",
    "verify_fold",
]


def _inputs(example_input: Any) -> list[tuple[str, Any]]:
    inputs = [("example", example_input)]
    rand = random_like(example_input)
    if rand is not None:
        inputs.append(("random", rand))
    return inputs


def verify_fold(
    reference: nn.Module,
    folded: nn.Module,
    example_input: Any,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> float:
    """Max abs output difference of two models on ``example_input`` and a random input.

    Both run in eval mode (their training flags restored after). Raises FoldError when an
    output differs by more than ``atol + rtol * max|output|`` (rule 1 of
    :mod:`easier.merge.verify`; :func:`fold` also re-checks a failing float32 fold in float64).
    """
    v = judge_outputs(reference, folded, _inputs(example_input), rtol, atol)
    if not v.ok:
        raise FoldError(f"folded model differs from the original: {v} (allowed: atol {atol} + "
                        f"rtol {rtol} x output magnitude).")
    return v.err


def fold(
    model: nn.Module,
    example_input: Any,
    plan: str | FoldPlan = "latency",
    *,
    batch_sizes: Sequence[int] | None = None,
    latency: LatencyConfig | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> fx.GraphModule:
    """Return an eval-mode GraphModule computing ``model``'s function with fewer layers.

    ``plan`` is a planner mode ("latency", "flops", "all", "none"; see :mod:`easier.fold.plan`)
    or a :class:`FoldPlan` from :func:`plan_fold` (e.g. one saved to JSON) to apply as it is.
    The "latency" plan holds for ``batch_sizes`` (default: the example's batch size): a chain is
    merged only if no named size gets slower; ``latency`` (a :class:`LatencyConfig`) tunes the
    timing. BN folding is done in every mode. ``model`` is not modified. With
    ``verify``, the result is compared with the original on ``example_input`` and on a random
    input of the same shape, by the rule of :mod:`easier.merge.verify` (tolerance scaled by the
    output's magnitude; a float32 miss is re-checked in float64, so only a fold that is wrong
    in float64 raises FoldError); the max error is recorded as
    ``result.fold_plan.max_abs_error``.

    The result is an inference graph: BN folded, identities and dropouts removed.
    """
    if isinstance(plan, FoldPlan):
        fold_plan = copy.deepcopy(plan)
    elif isinstance(plan, str):
        fold_plan = plan_fold(model, example_input, plan, batch_sizes=batch_sizes,
                              latency=latency)
    else:
        raise ConfigError(f"plan must be a mode name or a FoldPlan, not {type(plan).__name__}")
    gm = build_folded(model, example_input, fold_plan)
    gm.eval()
    if verify:
        reference = copy.deepcopy(model)
        v = judge_outputs(reference, gm, _inputs(example_input), rtol, atol)
        if not v.ok and not _is_float64(reference):
            _, note = explain_float64(model, example_input, fold_plan, build_folded, v,
                                      rtol, atol)
            fold_plan.notes.append(note)
        elif not v.ok:
            explain_float64(reference, example_input, fold_plan, build_folded, v, rtol, atol)
        fold_plan.max_abs_error = v.err
    gm.fold_plan = fold_plan
    return gm


def _is_float64(model: nn.Module) -> bool:
    return any(p.dtype == torch.float64 for p in model.parameters())
