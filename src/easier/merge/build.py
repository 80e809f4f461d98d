"""Apply a FoldPlan: the prepared graph with the plan's "merge" chains merged (no checks)."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from easier.errors import ConfigError
from easier.merge.algebra import apply_merges, merge_chain
from easier.merge.chains import find_chains
from easier.merge.graph import prepare

__all__ = ["build_folded"]


def build_folded(model: nn.Module, example_input: Any, fold_plan: Any) -> fx.GraphModule:
    """The prepared copy of ``model`` (BN folded) with the plan's "merge" chains merged.

    No verification: :func:`fold` is the checked entry point.
    """
    gm, _ = prepare(model, example_input)
    chains = {c.id: c for c in find_chains(gm)}
    merges = []
    for decision in fold_plan.chains:
        if decision.decision != "merge":
            continue
        chain = chains.get(decision.chain_id)
        if (
            chain is None
            or chain.modules != decision.modules
            or chain.residual != decision.residual
        ):
            raise ConfigError(
                f"the fold plan does not match this model (chain {decision.chain_id}: "
                f"{decision.modules}); make a new plan with plan_fold(model, example_input)."
            )
        merges.append((chain, merge_chain(gm, chain)))
    apply_merges(gm, merges)
    return gm.eval()
