"""What a removal buys, and a removal cost priced by it: shared by easier-latency, probe, taylor.

:func:`fold_credits` is easier-latency's saving per removed site (the time or FLOPs the fold
saves once the site is linear, :class:`easier.merge.savings.FoldSavings`, plus with ``lookahead``
half the synergy with an adjacent site). :class:`Pricing` divides a criterion's cost (a measured
or estimated loss change) by that saving, so a method that guesses or measures accuracy cost can
also ask what each unit of cost buys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from easier.errors import ConfigError
from easier.graph.capture import to_device
from easier.merge.latency import LatencyConfig
from easier.merge.savings import COSTS, FoldSavings

__all__ = ["PRICES", "Pricing", "fold_credits", "price_per_saving"]

PRICES = (None, *COSTS)  # None: rank by cost alone


def fold_credits(savings: FoldSavings, model: nn.Module, example: Any, kinds: Sequence[str],
                 order: Sequence[str], candidates: Sequence[str], lookahead: bool = True
                 ) -> dict[str, float]:
    """Saving per removed site for each candidate (ms, or FLOPs with ``cost="flops"``).

    A site's own saving, plus with ``lookahead`` half the synergy with an adjacent site of
    ``order`` (the remaining sites in model order): what removing both saves beyond what each
    saves alone (a merge that needs both, e.g. an inverted residual).
    """
    graph = savings.graph(model, to_device(example, "cpu"), kinds)
    base = savings.saving(graph, [])
    alone: dict[str, float] = {}

    def single(s: str) -> float:
        if s not in alone:
            alone[s] = savings.saving(graph, [s]) - base
        return alone[s]

    gain = {s: single(s) for s in candidates}
    if lookahead:
        order = list(order)
        pairs: dict[frozenset[str], float] = {}  # a pair of candidates is priced once
        for s in candidates:
            i = order.index(s)
            for t in order[max(0, i - 1): i] + order[i + 1: i + 2]:
                key = frozenset((s, t))
                if key not in pairs:
                    pairs[key] = savings.saving(graph, [s, t]) - base
                synergy = pairs[key] - single(s) - single(t)
                gain[s] = max(gain[s], single(s) + synergy / 2)
    return gain


def price_per_saving(cost: float, saving: float) -> float | None:
    """Cost per unit saved, monotone in both (lower = better); None when nothing is saved.

    ``cost / saving`` for a positive cost. A cost <= 0 (the removal is predicted or measured not
    to hurt) gives ``cost * saving``: still <= 0, so below every positive cost, and lower for a
    larger saving — dividing a negative cost would prefer the *smaller* saving.
    """
    if saving <= 0:
        return None
    return cost / saving if cost > 0 else cost * saving


class Pricing:
    """A criterion's cost, optionally divided by the fold saving (``price``: None, "latency",
    "flops"); prices of chains are kept across iterations as in easier-latency."""

    def __init__(self, price: str | None = None, lookahead: bool = True,
                 batch_sizes: Sequence[int] = (1,), latency: LatencyConfig | None = None):
        if price not in PRICES:
            raise ConfigError(f"price={price!r}; valid: {list(PRICES)} (None: rank by cost "
                              "alone; 'latency'/'flops': cost per ms/FLOP the fold saves)")
        self.price = price
        self.lookahead = bool(lookahead)
        self.savings = None if price is None else FoldSavings(price, latency, tuple(batch_sizes))

    def rank(self, model: nn.Module, example: Any, kinds: Sequence[str], order: Sequence[str],
             cost: dict[str, float]) -> tuple[list[str], dict[str, Any]]:
        """``order`` (the remaining sites) ranked cheapest first, and what to record.

        Unpriced: by cost, ties to the earlier site. Priced: sites whose fold saves something
        first, by :func:`price_per_saving`; then the others by cost (as easier-latency falls
        back to entropy when nothing pays).
        """
        pos = {n: i for i, n in enumerate(order)}
        if self.savings is None:
            return sorted(order, key=lambda n: (cost[n], pos[n])), {}
        gain = fold_credits(self.savings, model, example, kinds, order, list(order),
                            self.lookahead)
        priced = {n: price_per_saving(cost[n], gain[n]) for n in order}
        ranked = sorted(order, key=lambda n: (priced[n] is None,
                                              cost[n] if priced[n] is None else priced[n],
                                              pos[n]))
        unit = "ms" if self.price == "latency" else "FLOPs"
        return ranked, {"fold_saving": gain, "fold_saving_unit": unit, "priced": priced}
