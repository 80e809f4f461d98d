"""EASIER: linearize the site whose ON/OFF state has the lowest entropy (Quétu et al., 2024)."""

from __future__ import annotations

from .base import Context, SiteMethod, Step, register_method


@register_method
class Easier(SiteMethod):
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

    def score(self, ctx: Context) -> dict[str, float]:
        report = ctx.entropy()
        return {n: report[n] for n in ctx.remaining}

    def step(self, ctx: Context) -> Step:
        step = super().step(ctx)
        if self.also_zero:
            extra = [n for n in ctx.remaining if step.scores[n] == 0.0 and n not in step.chosen]
            if extra:
                chosen = step.chosen + extra
                return Step(ctx.linearize(chosen), chosen, step.scores, "lowest entropy + zeros")
        return step
