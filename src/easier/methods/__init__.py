"""Depth-reduction methods behind one interface: ``reduce(..., method=NAME)``."""

from . import controls, easier, egp, lacoot, layer_folding, nepenthe, tlc  # noqa: F401  (registers the methods)
from .base import (
    Context,
    Method,
    SiteMethod,
    Step,
    create_method,
    list_methods,
    register_method,
)

__all__ = ["Context", "Method", "SiteMethod", "Step", "create_method", "list_methods",
           "register_method"]
