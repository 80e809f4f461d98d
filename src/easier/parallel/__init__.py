"""Distributed primitives for running easier under ``torchrun`` (plain ``torch.distributed``).

Every function works unchanged in a single process: without torchrun's environment there is no
process group, loaders are the usual seeded ones, reductions return their input and
``wrap_ddp`` returns the model. Under torchrun:

- training shards with ``DistributedSampler`` (which pads so every rank runs the same number of
  steps: DDP would hang otherwise);
- the entropy pass and evaluation use *exact* shards: contiguous, batch-aligned, disjoint,
  covering each sample once. Concatenating the ranks' batches in rank order gives exactly the
  single-process ``make_loader(shuffle=False)`` batches, so summed counts, batch and sample
  counts are bit for bit those of one process;
- every collective is bounded by the process-group timeout (``init_from_env(timeout_s=...)``,
  ``easier ... --dist-timeout``): a frozen or dead rank makes the others stop with an error.

Collectives that follow per-rank work first share a "failed" flag, so an error on one rank
(a NaN, a shape change) makes every rank raise instead of leaving the others waiting forever.

The code lives in :mod:`easier.parallel` (runtime, loaders, collectives, passes); this module is
the public face that gathers it.
"""

from __future__ import annotations

from easier.parallel.collectives import all_reduce_counters, any_failed, reduce_accuracy
from easier.parallel.loaders import shard_indices_exact, shard_loader
from easier.parallel.passes import (
    evaluate_distributed,
    measure_entropy_distributed,
    unwrap,
    wrap_ddp,
)
from easier.parallel.runtime import (
    DEFAULT_TIMEOUT_S,
    DistInfo,
    DistTimeoutError,
    barrier,
    cleanup,
    get_info,
    init_from_env,
    is_main,
    main_only,
    timed_out,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "DistTimeoutError",
    "all_reduce_counters",
    "any_failed",
    "barrier",
    "cleanup",
    "evaluate_distributed",
    "get_info",
    "init_from_env",
    "is_main",
    "main_only",
    "measure_entropy_distributed",
    "reduce_accuracy",
    "shard_indices_exact",
    "shard_loader",
    "timed_out",
    "unwrap",
    "wrap_ddp",
]
