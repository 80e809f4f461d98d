"""The fold's verification rule: refuse a fold only when the fold itself is wrong.

A merged chain computes the same function in a different order of float operations, so a
float32 fold differs from the float32 model by the model's own rounding, which grows with the
output's magnitude and the network's conditioning (a deep, randomly initialised network can
reach outputs of 1e16, where float32 rounding alone is 1e9). One rule for every plan:

1. the float32 (model dtype) fold passes when ``max|ref - fold| <= atol + rtol * max|ref|``
   for every output (scaled by the output's magnitude, not element by element);
2. otherwise the same plan is applied to a float64 copy: when that fold passes the same test
   against the float64 model, the fold is exact and the float32 difference is rounding (passed,
   with a note giving both numbers); when it fails, the merged chains that are wrong in float64
   are named (each folded alone) and FoldError says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from easier.errors import FoldError
from easier.graph.capture import call_model

__all__ = ["Verdict", "explain_float64", "flatten_outputs", "judge_outputs", "random_like",
           "to_float64"]


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output (tensors, tuples, dicts, Hugging Face ModelOutputs)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput is a dict subclass
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


def random_like(example_input: Any) -> Any:
    """A same-shaped random input, or None when an input is not a floating tensor."""
    gen = torch.Generator().manual_seed(0)
    leaves, spec = pytree.tree_flatten(example_input)
    if not leaves or not all(isinstance(a, torch.Tensor) and a.is_floating_point()
                             for a in leaves):
        return None
    out = [torch.randn(a.shape, generator=gen, dtype=a.dtype).to(a.device) for a in leaves]
    return pytree.tree_unflatten(out, spec)


def to_float64(x: Any) -> Any:
    """``x`` with every floating tensor in float64 (other leaves unchanged)."""
    return pytree.tree_map(
        lambda a: a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a, x)


class Verdict:
    """The worst output difference of one comparison and whether it passes the rule."""

    def __init__(self, err: float, scale: float, ok: bool, label: str):
        self.err, self.scale, self.ok, self.label = err, scale, ok, label

    def __str__(self) -> str:
        return f"max |err| {self.err:.3g} on outputs up to {self.scale:.3g} ({self.label} input)"


def _run(model: nn.Module, args: Any) -> list[torch.Tensor]:
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return flatten_outputs(call_model(model, args))
    finally:
        for m, t in flags.items():
            m.training = t


def judge_outputs(reference: nn.Module, folded: nn.Module, inputs: list[tuple[str, Any]],
                  rtol: float, atol: float) -> Verdict:
    """The first failing (else the worst) comparison of two models over ``inputs``."""
    worst = Verdict(0.0, 0.0, True, inputs[0][0])
    for label, args in inputs:
        want, got = _run(reference, args), _run(folded, args)
        if len(want) != len(got) or any(a.shape != b.shape
                                         for a, b in zip(want, got, strict=False)):
            raise FoldError(f"fold changed the output structure or shapes on the {label} "
                            "input; please report this model.")
        for a, b in zip(want, got, strict=True):
            if not a.numel():
                continue
            a64, b64 = a.double(), b.double()
            err = float((a64 - b64).abs().max())
            scale = float(a64.abs().max())
            ok = bool(err <= atol + rtol * scale) and bool(torch.isfinite(b64).all()
                                                           or not torch.isfinite(a64).all())
            if not ok:
                return Verdict(err, scale, False, label)
            if err > worst.err:
                worst = Verdict(err, scale, True, label)
    return worst


def explain_float64(model: nn.Module, example_input: Any, fold_plan: Any,
                    build: Callable[[nn.Module, Any, Any], nn.Module],
                    first: Verdict, rtol: float, atol: float) -> tuple[float, str]:
    """Re-judge a float32 fold that failed rule 1 in float64 (see the module doc).

    Returns (float64 fold error, note) when the float64 fold is exact; raises FoldError naming
    the wrong chains otherwise.
    """
    try:
        ref64 = copy.deepcopy(model).double()
        ex64 = to_float64(example_input)
        inputs = [("example", ex64)]
        rand = random_like(ex64)
        if rand is not None:
            inputs.append(("random", rand))
        own = max((float((a.double() - b).abs().max()) for a, b in zip(
            _run(model, example_input), _run(ref64, ex64), strict=False) if a.numel()),
            default=0.0)
        v64 = judge_outputs(ref64, build(ref64, ex64, fold_plan), inputs, rtol, atol)
    except FoldError:
        raise
    except Exception as exc:  # a model that cannot run in float64: rule 1 stands
        raise FoldError(
            f"folded model differs from the original: {first} (allowed: atol {atol} + rtol "
            f"{rtol} x output magnitude), and the fold could not be re-checked in float64 "
            f"({type(exc).__name__}: {exc}); fold with plan='none' (BN folding only)."
        ) from exc
    if v64.ok:
        note = (f"float32 fold differs by {first}, the float32 model's own rounding (float32 vs "
                f"float64 of the unfolded model: {own:.3g}); the same fold in float64 is "
                f"exact ({v64.err:.3g} on outputs up to {v64.scale:.3g})")
        return v64.err, note
    bad = []
    for d in fold_plan.merged:
        alone = copy.deepcopy(fold_plan)
        for c in alone.chains:
            if c.decision == "merge" and c.chain_id != d.chain_id:
                c.decision = "keep"
        if not judge_outputs(ref64, build(ref64, ex64, alone), inputs[:1], rtol, atol).ok:
            bad.append(f"{d.chain_id} ({'>'.join(d.modules)})")
    which = (f"merged chain(s) {', '.join(bad)} are not exact even in float64"
             if bad else "the merged chains are exact one by one but not together")
    raise FoldError(
        f"folded model differs from the original: {v64} in float64 ({first} in the model's "
        f"dtype); {which}. A chain whose later convs pad is inexact at the borders: relocate "
        "its padding (linearize(fold_ready=True)) before fine-tuning, or fold with plan='none' "
        "(BN folding only)."
    )
