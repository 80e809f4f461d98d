"""easier: make trained networks shallower by removing their most linear activations.

The pipeline, one module per step::

    find_sites -> measure_entropy -> choose (method) -> linearize -> fine-tune -> fold -> measure
"""

from .entropy import EntropyReport, NeuronStats, binary_entropy, measure_entropy
from .errors import (
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
from .fold import FoldPlan, fold, plan_fold
from .linearize import linearize, linearized_sites, replace_with_identity
from .loop import ReduceResult, reduce
from .measurement import Measurement, compare_table, measure
from .padding import fold_ready
from .recovery import Recovery
from .settings import EntropyConfig, RunConfig, StopRule
from .sites import KINDS, EasierWarning, Site, find_sites
from .state import load_model, save_model
from .train import FineTune

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
