"""Stage 4, merge: fold linear layers that an edit made adjacent into fewer real layers.

:func:`easier.fold` and :func:`easier.plan_fold` are the verbs; this package holds the graph
they work on (:mod:`.graph`), the chains (:mod:`.chains`), the merge maths (:mod:`.algebra`),
the per-chain decision (:mod:`.plan`, :mod:`.latency`, :mod:`.savings`) and the rebuilt module
(:mod:`.build`). Named ``merge`` so that no package shadows the ``fold`` function.
"""

from easier.merge.api import (
    MODES,
    Chain,
    ChainDecision,
    FoldPlan,
    LatencyConfig,
    TimingJob,
    apply_merges,
    build_folded,
    chain_flops,
    chain_is_exact,
    chain_signature,
    find_chains,
    fold,
    layer_flops,
    merge_chain,
    plan_fold,
    prepare,
    register_mode,
    verify_fold,
)

__all__ = ["MODES", "Chain", "ChainDecision", "FoldPlan", "LatencyConfig", "TimingJob",
           "apply_merges", "build_folded", "chain_flops", "chain_is_exact", "chain_signature",
           "find_chains", "fold", "layer_flops", "merge_chain", "plan_fold", "prepare",
           "register_mode", "verify_fold"]
