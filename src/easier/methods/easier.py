"""EASIER: linearize the site whose ON/OFF state has the lowest entropy (Quétu et al., 2024)."""

from __future__ import annotations

from .base import Choice, Context, Method, register_method


@register_method
class Easier(Method):
    """Lowest layer entropy first; ties go to the earlier site.

    ``also_zero=True`` also removes every other site whose entropy is exactly 0 in the same
    iteration, as the reference code does.
    """

    name = "easier"
    description = "lowest layer entropy first (the paper)"

    def __init__(self, also_zero: bool = False):
        self.also_zero = also_zero

    def options(self) -> dict[str, bool]:
        return {"also_zero": self.also_zero}

    def choose(self, ctx: Context) -> Choice:
        scores = {n: ctx.report[n] for n in ctx.remaining}
        order = ctx.report.ranking(exclude=ctx.removed)
        chosen = order[: ctx.k]
        if self.also_zero:
            chosen += [n for n in order[ctx.k:] if scores[n] == 0.0]
        return Choice(chosen, scores, "lowest entropy")
