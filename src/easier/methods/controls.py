"""Control orders for ablations: they show whether the entropy order matters."""

from __future__ import annotations

from .base import Choice, Context, Method, register_method


@register_method
class RandomOrder(Method):
    """A uniformly random remaining site (seeded per iteration)."""

    name = "random"
    description = "random site (control)"

    def choose(self, ctx: Context) -> Choice:
        chosen = ctx.rng.sample(sorted(ctx.remaining, key=ctx.remaining.index), ctx.k)
        return Choice(chosen, {n: ctx.report[n] for n in ctx.remaining}, "random")


@register_method
class MaxEntropy(Method):
    """Highest layer entropy first: the opposite of EASIER."""

    name = "max-entropy"
    description = "highest layer entropy first (control)"

    def choose(self, ctx: Context) -> Choice:
        scores = {n: ctx.report[n] for n in ctx.remaining}
        order = {n: i for i, n in enumerate(ctx.remaining)}
        ranked = sorted(ctx.remaining, key=lambda n: (-scores[n], order[n]))
        return Choice(ranked[: ctx.k], {n: -s for n, s in scores.items()}, "highest entropy")
