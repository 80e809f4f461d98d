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
from torch.utils import _pytree as pytree

from easier.errors import ConfigError, FoldError
from easier.graph.capture import call_model
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


def _flatten(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output (tensors, tuples, dicts, Hugging Face ModelOutputs)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput is a dict subclass
        return [t for k in sorted(out, key=str) for t in _flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _random_like(example_input: Any) -> Any:
    """A same-shaped random input, or None when an input is not a floating tensor."""
    gen = torch.Generator().manual_seed(0)
    leaves, spec = pytree.tree_flatten(example_input)
    if not leaves or not all(isinstance(a, torch.Tensor) and a.is_floating_point()
                             for a in leaves):
        return None
    out = [torch.randn(a.shape, generator=gen, dtype=a.dtype).to(a.device) for a in leaves]
    return pytree.tree_unflatten(out, spec)


def verify_fold(
    reference: nn.Module,
    folded: nn.Module,
    example_input: Any,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> float:
    """Max abs output difference of two models on ``example_input`` and a random input.

    Both run in eval mode (on copies of their training flags, restored after). Raises FoldError
    when any output differs beyond ``rtol``/``atol`` (``torch.allclose`` semantics).
    """
    inputs = [("example", example_input)]
    rand = _random_like(example_input)
    if rand is not None:
        inputs.append(("random", rand))
    flags = {m: m.training for mod in (reference, folded) for m in mod.modules()}
    worst = 0.0
    try:
        reference.eval()
        folded.eval()
        for label, args in inputs:
            with torch.no_grad():
                want = _flatten(call_model(reference, args))
                got = _flatten(call_model(folded, args))
            if len(want) != len(got) or any(
                a.shape != b.shape for a, b in zip(want, got, strict=False)
            ):
                raise FoldError(
                    f"fold changed the output structure or shapes on the {label} "
                    "input; please report this model."
                )
            for a, b in zip(want, got, strict=True):
                err = float((a - b).abs().max()) if a.numel() else 0.0
                worst = max(worst, err)
                if not torch.allclose(a, b, rtol=rtol, atol=atol):
                    raise FoldError(
                        f"folded model differs from the original by max |err| = {err:.3g} on "
                        f"the {label} input (rtol={rtol}, atol={atol}). A merged chain was not "
                        "exact: relocate its padding (fold_ready / linearize(fold_ready=True)) "
                        "before fine-tuning, or fold with plan='none' (BN folding only)."
                    )
    finally:
        for m, t in flags.items():
            m.training = t
    return worst


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
    input of the same shape; FoldError is raised beyond ``rtol``/``atol``, and the max error is
    recorded as ``result.fold_plan.max_abs_error``.

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
        fold_plan.max_abs_error = verify_fold(reference, gm, example_input, rtol=rtol, atol=atol)
    gm.fold_plan = fold_plan
    return gm
