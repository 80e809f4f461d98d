"""easier: make trained networks shallower by removing their most linear activations.

The pipeline, one module per step::

    find_sites -> measure_entropy -> choose (method) -> linearize -> fine-tune -> fold -> measure
"""

from easier.edit.linearize import linearize, linearized_sites, replace_with_identity
from easier.edit.padding import fold_ready
from easier.entropy.estimate import EntropyReport, NeuronStats, binary_entropy, measure_entropy
from easier.errors import (
    ConfigError,
    DataError,
    EasierError,
    FoldError,
    NonFiniteError,
    NoSitesError,
    SiteError,
    StateError,
    TraceError,
)
from easier.graph.sites import KINDS, EasierWarning, Site, find_sites
from easier.io.records import load_model, save_model
from easier.merge import FoldPlan, fold, plan_fold
from easier.perf.measure import Measurement, compare_table, measure
from easier.pipeline.reduce import ReduceResult, reduce
from easier.pipeline.settings import EntropyConfig, RunConfig, StopRule
from easier.train.finetune import FineTune
from easier.train.recovery import Recovery

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "ConfigError",
    "DataError",
    "EasierError",
    "EasierWarning",
    "EntropyConfig",
    "EntropyReport",
    "FineTune",
    "FoldError",
    "FoldPlan",
    "Measurement",
    "NeuronStats",
    "NoSitesError",
    "NonFiniteError",
    "Recovery",
    "ReduceResult",
    "RunConfig",
    "Site",
    "SiteError",
    "StateError",
    "StopRule",
    "TraceError",
    "binary_entropy",
    "compare_table",
    "find_sites",
    "fold",
    "fold_ready",
    "linearize",
    "linearized_sites",
    "load_model",
    "measure",
    "measure_entropy",
    "plan_fold",
    "reduce",
    "replace_with_identity",
    "save_model",
]
