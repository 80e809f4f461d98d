"""Depth-reduction methods behind one interface: ``reduce(..., method=NAME)``."""

from . import controls, easier  # noqa: F401  (registers the methods)
from .base import Choice, Context, Method, create_method, list_methods, register_method

__all__ = ["Choice", "Context", "Method", "create_method", "list_methods", "register_method"]
