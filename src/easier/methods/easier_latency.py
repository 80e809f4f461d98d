"""EASIER-latency: among the most linear sites, remove the one whose fold saves the most time.

EASIER's lowest-entropy site is often one whose removal enables no merge (a ReLU after a residual
add) or a merge that is slower than what it replaces (3x3∘3x3 -> 5x5 on a CPU). LayerMerge
(Kim et al., ICML 2024) chooses removals by a latency table measured on the target hardware;
this method keeps EASIER's criterion as the guard on accuracy and adds that payoff:

1. rank the remaining sites by entropy and keep the ``pool`` fraction with the lowest;
2. price each of them by the time the fold would save once it is linear
   (:class:`easier.merge.savings.FoldSavings`: chains timed unmerged vs merged at the real input
   shape, at ``batch_sizes``, a merge counted only when it is faster beyond the noise band);
   with ``lookahead`` a site is also credited half its synergy with an adjacent site (what
   removing both saves beyond each alone: an inverted residual collapses only when both go);
3. remove the site with the largest saving per removed site; when none saves anything, the
   lowest-entropy site, as EASIER would.

``pool`` is the trade-off: 1/n (one site) is EASIER itself; 1.0 ranks every site by saving alone.
The default 0.5 lets the fold choose among the more linear half. ``cost="flops"`` prices merges
by FLOPs instead of time (deterministic, hardware-free).
"""

from __future__ import annotations

import math
from typing import Any

from easier.errors import ConfigError
from easier.merge.latency import LatencyConfig
from easier.merge.savings import COSTS, FoldSavings
from easier.methods.base import Context, Method, Step, register_method


@register_method
class EasierLatency(Method):
    """Largest measured fold saving among the lowest-entropy sites (EASIER when none saves)."""

    name = "easier-latency"
    description = "largest fold saving among the lowest-entropy sites"

    def __init__(self, pool: float = 0.5, cost: str = "latency",
                 batch_sizes: int | tuple[int, ...] | list[int] = (1,), lookahead: bool = True,
                 latency: LatencyConfig | None = None):
        if not 0 < float(pool) <= 1:
            raise ConfigError(f"pool={pool!r}: the fraction of lowest-entropy sites priced, "
                              "in (0, 1]")
        if cost not in COSTS:
            raise ConfigError(f"cost={cost!r}; valid: {list(COSTS)}")
        self.pool = float(pool)
        self.cost = cost
        if isinstance(batch_sizes, int):  # `--method-option batch_sizes=64`
            batch_sizes = (batch_sizes,)
        self.batch_sizes = tuple(int(b) for b in batch_sizes)
        self.lookahead = bool(lookahead)
        self.savings = FoldSavings(cost, latency, self.batch_sizes)  # prices kept across iterations

    def options(self) -> dict[str, Any]:
        return {"pool": self.pool, "cost": self.cost, "batch_sizes": list(self.batch_sizes),
                "lookahead": self.lookahead}

    def credits(self, ctx: Context, candidates: list[str]) -> dict[str, float]:
        """Saving per removed site for each candidate (ms, or FLOPs with ``cost="flops"``).

        A site's own saving, plus with ``lookahead`` half the synergy with an adjacent site:
        what removing both saves beyond what each saves alone (a merge that needs both).
        """
        graph = self.savings.graph(ctx.model, self.example, ctx.kinds)
        base = self.savings.saving(graph, [])
        alone: dict[str, float] = {}

        def single(s: str) -> float:
            if s not in alone:
                alone[s] = self.savings.saving(graph, [s]) - base
            return alone[s]

        gain = {s: single(s) for s in candidates}
        if self.lookahead:
            order = ctx.remaining
            pairs: dict[frozenset[str], float] = {}  # a pair of candidates is priced once
            for s in candidates:
                i = order.index(s)
                for t in order[max(0, i - 1): i] + order[i + 1: i + 2]:
                    key = frozenset((s, t))
                    if key not in pairs:
                        pairs[key] = self.savings.saving(graph, [s, t]) - base
                    synergy = pairs[key] - single(s) - single(t)
                    gain[s] = max(gain[s], single(s) + synergy / 2)
        return gain

    def step(self, ctx: Context) -> Step:
        report = ctx.entropy()
        order = {n: i for i, n in enumerate(ctx.remaining)}
        ranked = sorted(ctx.remaining, key=lambda n: (report[n], order[n]))
        pool = ranked[: max(1, math.ceil(self.pool * len(ranked)))]
        gain = self.credits(ctx, pool)
        chosen: list[str] = []
        while len(chosen) < ctx.k:
            left = [s for s in pool if s not in chosen]
            paying = [s for s in left if gain[s] > 0]
            if paying:  # largest saving; ties to the lower entropy (pool is entropy-ordered)
                chosen.append(max(paying, key=lambda s: (gain[s], -pool.index(s))))
            else:
                chosen.append(next(s for s in ranked if s not in chosen))
        unit = "ms" if self.cost == "latency" else "FLOPs"
        paid = [s for s in chosen if gain.get(s, 0) > 0]
        reason = (f"largest fold saving among the {len(pool)} lowest-entropy sites"
                  if paid else "no candidate's fold saves: lowest entropy")
        scores = {n: report[n] for n in ctx.remaining}
        info = {"fold_saving": {s: gain[s] for s in pool}, "fold_saving_unit": unit}
        return Step(ctx.linearize(chosen), chosen, scores, reason, info)
