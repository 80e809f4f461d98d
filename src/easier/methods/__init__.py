"""Depth-reduction methods behind one interface: ``reduce(..., method=NAME)``."""

from easier.methods import (  # noqa: F401  (registers the methods)
    controls,
    easier,
    easier_latency,
    egp,
    lacoot,
    layer_folding,
    nepenthe,
    probe,
    taylor,
    tlc,
)
from easier.methods.base import (
    Context,
    Method,
    SiteMethod,
    Step,
    create_method,
    list_methods,
    method_descriptions,
    register_method,
)

__all__ = ["Context", "Method", "SiteMethod", "Step", "create_method", "list_methods",
           "method_descriptions", "register_method"]
