"""Control orders for ablations: they show whether the entropy order matters.

Both still measure the entropy (it is recorded in the history for analysis), but ignore it
(``random``) or use it backwards (``max-entropy``).
"""

from __future__ import annotations

from easier.methods.base import Context, SiteMethod, register_method


@register_method
class RandomOrder(SiteMethod):
    """A uniformly random remaining site (seeded per iteration)."""

    name = "random"
    description = "random site (control)"

    def score(self, ctx: Context) -> dict[str, float]:
        ctx.entropy()  # recorded for the comparison, not used
        return {n: ctx.rng.random() for n in ctx.remaining}


@register_method
class MaxEntropy(SiteMethod):
    """Highest layer entropy first: the opposite of EASIER."""

    name = "max-entropy"
    description = "highest layer entropy first (control)"

    def score(self, ctx: Context) -> dict[str, float]:
        report = ctx.entropy()
        return {n: -report[n] for n in ctx.remaining}
