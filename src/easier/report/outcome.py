"""What a run gives back: the dense model the user gave vs the model they get, side by side.

Everything is read from a run's history (iteration 0 is the dense model, the last accepted
record is the kept one) and, when the run folded, from the fold's before/after measurements
(the returned model is then the folded one). Latency is only what the fold already measured:
the kept model unfolded vs folded; the dense model is never timed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["Outcome", "Side", "near_chance", "nonzero_params", "outcome", "outcome_of",
           "outcome_table", "returned_nonzero", "speed", "summary_line", "write_outcome"]


@dataclass(frozen=True)
class Side:
    """Accuracy and cost of one model (None: not known)."""

    val_acc: float | None
    test_acc: float | None
    depth: int | None
    activations: int | None
    params: int | None
    nonzero_params: int | None
    flops_per_sample: float | None


@dataclass(frozen=True)
class Outcome:
    """Dense vs returned, the number of removed units, and the fold's latencies.

    ``latency`` maps a batch size to (ms unfolded, ms folded) medians of the kept model;
    ``band`` to the noise band (lo, hi) of the ratio folded/unfolded when the two were timed
    side by side (a band that holds 1 means the timing could not tell them apart).
    """

    dense: Side
    returned: Side
    removed_units: int
    unit: str
    folded: bool
    latency: dict[int, tuple[float, float]]
    band: dict[int, tuple[float, float]] = field(default_factory=dict)


def nonzero_params(model: nn.Module) -> int:
    """Parameter entries that are not exactly zero (pruned weights do not count)."""
    return sum(int((p.detach() != 0).sum()) for p in model.parameters())


def returned_nonzero(result: Any) -> int:
    """Non-zero params of the model handed back: the folded program when one was written."""
    from easier.io.artifacts import load_folded  # every pickle inside read weights_only

    folded = result.out / "folded.pt2" if result.out is not None else None
    if "fold" in result.extras and folded is not None and folded.is_file():
        try:
            return nonzero_params(load_folded(folded))
        except Exception:  # an unreadable program: count the kept model instead
            pass
    return nonzero_params(result.model)


def outcome_of(result: Any, unit: str) -> Outcome:
    """The :class:`Outcome` of a finished :func:`easier.reduce` (its ReduceResult)."""
    return outcome(result.history, result.extras.get("fold"), unit=unit,
                   dense_nonzero=result.history[0].get("nonzero_params"),
                   returned_nonzero=returned_nonzero(result))


def write_outcome(result: Any, report: Path, unit: str) -> Outcome:
    """:func:`outcome_of`, also written into the run's ``report.md`` as "What the run
    returned" (Python and CLI runs alike)."""
    from easier.io.atomic import atomic_write_text
    from easier.report.files import with_outcome

    o = outcome_of(result, unit)
    if report.is_file():
        atomic_write_text(report, with_outcome(report.read_text(), outcome_table(o),
                                               summary_line(o), result.extras.get("fold")))
    return o


def outcome(history: list[dict[str, Any]], fold: dict[str, Any] | None = None, *,
            unit: str = "site", dense_nonzero: int | None = None,
            returned_nonzero: int | None = None) -> Outcome:
    """The :class:`Outcome` of a run from its history and (optionally) ``fold_run``'s result."""
    h0 = history[0]
    kept = next(h for h in reversed(history) if h["accepted"])
    dense_fps = kept_fps = None
    latency: dict[int, tuple[float, float]] = {}
    band: dict[int, tuple[float, float]] = {}
    if fold is not None:
        before, after = fold["before"], fold["after"]
        # the history counts FLOPs at the loop's example batch; the fold measured the kept
        # model per sample, which fixes the scale for the dense count too
        if kept.get("flops") and h0.get("flops") is not None:
            dense_fps = h0["flops"] * before["flops_per_sample"] / kept["flops"]
        kept_fps = after["flops_per_sample"]
        b = {lt["batch_size"]: lt["median_ms"] for lt in before.get("latency", ())}
        a = {lt["batch_size"]: lt["median_ms"] for lt in after.get("latency", ())}
        latency = {k: (b[k], a[k]) for k in sorted(b) if k in a}
        band = {int(p["batch_size"]): (float(p["ratio_lo"]), float(p["ratio_hi"]))
                for p in fold.get("paired", ()) if int(p["batch_size"]) in latency}
        cost = after
    else:
        cost = kept
    dense = Side(h0.get("val_acc"), h0.get("test_acc"), h0.get("depth"), h0.get("activations"),
                 h0.get("params"), dense_nonzero, dense_fps)
    returned = Side(kept.get("val_acc"), kept.get("test_acc"), cost.get("depth"),
                    cost.get("activations"), cost.get("params"), returned_nonzero, kept_fps)
    return Outcome(dense, returned, len(kept["removed"]), unit, fold is not None, latency, band)


def _human(x: float | None) -> str:
    if x is None:
        return "–"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.4g}"


def _minus(text: str) -> str:
    return text.replace("-", "−")


def _change(a: float | None, b: float | None, kind: str) -> str:
    if a is None or b is None:
        return "–"
    if kind == "pts":
        return _minus(f"{b - a:+.2f} pts")
    if kind == "count":
        return _minus(f"{b - a:+d}")
    return f"×{b / a:.3g}" if a else "–"


def speed(unfolded: float, folded: float, band: tuple[float, float] | None = None,
          where: str = "") -> str:
    """``1.25× faster`` or ``1.25× slower`` (never a factor below 1), then ``where``.

    With the noise ``band`` of the ratio folded/unfolded, a band that holds 1 makes no claim:
    ``no measurable difference`` and the band (a factor would contradict it)."""
    if band is not None and band[0] <= 1.0 <= band[1]:
        return (f"no measurable difference{where} (timing noise: folded/unfolded "
                f"{band[0]:.2f}–{band[1]:.2f})")
    return (f"{unfolded / folded:.2f}× faster" if folded <= unfolded else
            f"{folded / unfolded:.2f}× slower") + where


def outcome_table(o: Outcome) -> str:
    """Markdown: the dense model given vs the model returned, then the fold's latencies."""
    d, r = o.dense, o.returned
    pct = (lambda v: "–" if v is None else f"{v:.2f}")  # noqa: E731
    num = (lambda v: "–" if v is None else str(v))  # noqa: E731
    rows = [
        ("val top-1 (%)", pct(d.val_acc), pct(r.val_acc), _change(d.val_acc, r.val_acc, "pts")),
        ("test top-1 (%)", pct(d.test_acc), pct(r.test_acc),
         _change(d.test_acc, r.test_acc, "pts")),
        ("depth (weight layers on the longest path)", num(d.depth), num(r.depth),
         _change(d.depth, r.depth, "count")),
        ("activations", num(d.activations), num(r.activations),
         _change(d.activations, r.activations, "count")),
        ("params", _human(d.params), _human(r.params), _change(d.params, r.params, "ratio")),
        ("non-zero params", _human(d.nonzero_params), _human(r.nonzero_params),
         _change(d.nonzero_params, r.nonzero_params, "ratio")),
        ("FLOPs per sample", _human(d.flops_per_sample), _human(r.flops_per_sample),
         _change(d.flops_per_sample, r.flops_per_sample, "ratio")),
    ]
    head = "returned (folded)" if o.folded else "returned"
    lines = [f"| | dense (given) | {head} | change |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    for bs, (unfolded, folded) in o.latency.items():
        lines.append(f"\nlatency at batch {bs} (kept model, measured by the fold): "
                     f"{unfolded:.3g} ms unfolded → {folded:.3g} ms folded: "
                     f"{speed(unfolded, folded, o.band.get(bs))}")
    return "\n".join(lines)


def summary_line(o: Outcome) -> str:
    """One line, e.g. ``11/17 activations removed, depth 18 → 15, val −0.6 pts``."""
    d, r = o.dense, o.returned
    if d.activations is not None and r.activations is not None:
        parts = [f"{d.activations - r.activations}/{d.activations} activations removed"]
    else:
        parts = [f"{o.removed_units} {o.unit}(s) removed"]
    if d.depth is not None and r.depth is not None:
        parts.append(f"depth {d.depth} → {r.depth}")
    if 1 in o.latency:
        unfolded, folded = o.latency[1]
        parts.append(speed(unfolded, folded, o.band.get(1), " at batch 1 after folding"))
    if d.val_acc is not None and r.val_acc is not None:
        parts.append(_minus(f"val {r.val_acc - d.val_acc:+.1f} pts"))
    return ", ".join(parts)


def near_chance(val_acc: float, num_classes: int, margin: float = 5.0) -> str | None:
    """A warning when a dense model's val top-1 is within ``margin`` points of chance."""
    chance = 100.0 / num_classes
    if val_acc > chance + margin:
        return None
    return (f"warning: the dense model reaches only {val_acc:.1f}% val top-1, near chance "
            f"({chance:.1f}% for {num_classes} classes): removing activations from it says "
            "little. Train it longer (--pretrain-epochs, or reduce(pretrain=...)), use a wider "
            "model (--width) or a higher --lr, or start from trained weights (--checkpoint)")
