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
from .linearize import linearize, linearized_sites
from .sites import KINDS, EasierWarning, Site, find_sites

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "ConfigError",
    "DataError",
    "EasierError",
    "EasierWarning",
    "EntropyReport",
    "FoldError",
    "NeuronStats",
    "NoSitesError",
    "NonFiniteError",
    "Site",
    "SiteError",
    "StateError",
    "TraceError",
    "binary_entropy",
    "find_sites",
    "linearize",
    "linearized_sites",
    "measure_entropy",
]
