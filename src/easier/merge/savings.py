"""What a removal would buy: the time (or FLOPs) the fold saves if some sites were linear.

EASIER removes the most linear activation whatever that buys; the payoff of a removal is the
merge it enables, and on a CPU that payoff ranges from large (a MobileNetV2 inverted residual
collapsing into one conv) through nothing (a ReLU after a residual add enables no merge) to
negative (two 3x3 convs merged into a slower 5x5). :class:`FoldSavings` prices a hypothetical
removal from *one* capture of the current model: each candidate set of sites is bypassed in a
copy of that graph (no re-export), lifted and BN-folded as the fold does, and its chains are
priced; a chain is priced once per signature (layers and shapes) and the price is kept for later
iterations, so a run times each kind of chain once.

The estimate treats a chain whose later convs still pad as mergeable: at removal time the
padding is moved (``fold_ready``), which does not change the merged layer's cost.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from easier.errors import ConfigError
from easier.graph.capture import capture, copy_graph
from easier.graph.sites import KINDS, graph_sites
from easier.merge.candidates import chain_signature, make_candidate
from easier.merge.chains import find_chains
from easier.merge.graph import prepare_graph
from easier.merge.latency import LatencyConfig, judge

__all__ = ["COSTS", "ChainPrice", "FoldSavings", "SiteGraph"]

COSTS = ("latency", "flops")


@dataclass(frozen=True)
class ChainPrice:
    """One chain unmerged (``before``) and merged (``after``): ms at the first batch size, or
    FLOPs; ``pays`` when merging is faster beyond the noise (latency) or cheaper (FLOPs)."""

    before: float
    after: float
    pays: bool
    why: str = ""

    @property
    def saving(self) -> float:
        return self.before - self.after if self.pays else 0.0


@dataclass
class SiteGraph:
    """One capture of a model and where each of its sites sits in it (by node name)."""

    gm: fx.GraphModule
    example: Any
    sites: dict[str, tuple[str, str]]  # site -> (pre-activation node, output node)


def _editable_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a capture whose graph can be edited and prepared, sharing its tensors.

    Preparing (lift, BN fold) builds new layer modules and *reassigns* their weights, never
    writing into a captured tensor, so the copy can share them: a deep copy of every weight per
    priced candidate was a third of the pricing time. A capture that already calls modules
    (whose attributes preparing would reassign in place) is deep-copied instead.
    """
    if any(n.op == "call_module" for n in gm.graph.nodes):
        return copy_graph(gm)
    return fx.GraphModule(gm, copy_graph(gm.graph))  # new graph and containers, same tensors


class FoldSavings:
    """Prices of fold savings, cached per chain signature across calls (and iterations).

    ``cost="latency"`` times each new chain unmerged against merged (paired rounds, noise band,
    :class:`LatencyConfig`) at ``batch_sizes``; ``"flops"`` counts FLOPs (deterministic, no
    timing: for tests and for a hardware-free estimate).
    """

    def __init__(self, cost: str = "latency", latency: LatencyConfig | None = None,
                 batch_sizes: Sequence[int] = (1,)):
        if cost not in COSTS:
            raise ConfigError(f"cost={cost!r}; valid: {list(COSTS)}")
        if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
            raise ConfigError(f"batch_sizes must be positive integers; got {list(batch_sizes)}")
        self.cost = cost
        self.latency = latency or LatencyConfig()
        self.sizes = tuple(int(b) for b in batch_sizes)
        self.prices: dict[str, ChainPrice] = {}

    def graph(self, model: nn.Module, example: Any, kinds: Sequence[str] = KINDS) -> SiteGraph:
        """Capture ``model`` once (on a copy); every :meth:`saving` call edits a copy of it."""
        twin = copy.deepcopy(model).cpu().eval()
        cap = capture(twin, example)
        where = {g.site.name: (g.input.name, g.output.name)
                 for g in graph_sites(twin, cap, kinds)}
        return SiteGraph(cap.gm, example, where)

    def saving(self, graph: SiteGraph, sites: Sequence[str]) -> float:
        """Total price saved by every merge that pays once ``sites`` are linear (ms or FLOPs).

        Compare two calls (with and without a site) to get what that removal adds.
        """
        gm = _editable_copy(graph.gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        for name in sites:
            if name not in graph.sites:
                raise ConfigError(f"unknown site {name!r}; sites: {sorted(graph.sites)}")
            src, dst = (nodes[n] for n in graph.sites[name])
            dst.replace_all_uses_with(src)  # the activation's nodes are dead now; lift drops them
        gm.graph.eliminate_dead_code()
        gm, _ = prepare_graph(gm, graph.example, recompile=False)  # read, never called
        return sum(self._price(gm, chain).saving for chain in find_chains(gm))

    def _price(self, gm: fx.GraphModule, chain: Any) -> ChainPrice:
        sig = chain_signature(gm, chain)
        if sig not in self.prices:
            cand = make_candidate(gm, chain, self.latency, self.sizes)
            if self.cost == "flops":
                price = ChainPrice(cand.flops_before, cand.flops_after,
                                   cand.flops_after < cand.flops_before, "FLOPs")
            else:
                timings = cand.time()
                verdict, why = judge(timings, self.latency.margin)
                first = timings[cand.sizes[0]]
                price = ChainPrice(first.before_ms, first.after_ms, verdict == "faster", why)
            self.prices[sig] = price
        return self.prices[sig]
