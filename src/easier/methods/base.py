"""The interface every depth-reduction method implements, and the method registry.

A method only decides *which* sites to linearize at each iteration; the loop (train, measure,
linearize, fine-tune, evaluate, stop, save, resume, fold) is shared. Methods that need a
training-time regularizer or another score override the optional hooks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..entropy import EntropyReport
from ..errors import ConfigError

__all__ = ["Choice", "Context", "Method", "create_method", "list_methods", "register_method"]


@dataclass
class Context:
    """What a method may look at when choosing: the current model and its measured entropies."""

    model: nn.Module
    report: EntropyReport  # entropies of the remaining sites, measured on the training data
    remaining: list[str]  # sites still non-linear, in execution order
    removed: list[str]  # sites linearized so far, oldest first
    k: int  # how many sites to choose (1, or K in one-shot mode)
    iteration: int
    rng: random.Random  # seeded from (run seed, iteration): reproducible across resumes
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Choice:
    """The sites to linearize now, and the per-site scores that ranked them (lower goes first)."""

    sites: list[str]
    scores: dict[str, float]
    reason: str = ""


class Method:
    """Base class: subclass, set ``name``, implement :meth:`choose`, and register it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, **options: Any):
        if options:
            raise ConfigError(f"method {self.name!r} takes no options; got {sorted(options)}")

    def choose(self, ctx: Context) -> Choice:
        raise NotImplementedError

    def regularizer(self) -> Callable[[nn.Module], torch.Tensor] | None:
        """A loss term added during fine-tuning, or None."""
        return None

    def options(self) -> dict[str, Any]:
        """The method's options, recorded in the run's config."""
        return {}


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ConfigError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def create_method(method: str | Method, **options: Any) -> Method:
    """A Method instance from a registered name (or the instance itself)."""
    if isinstance(method, Method):
        return method
    if method not in _REGISTRY:
        raise ConfigError(f"unknown method {method!r}; valid methods: {list_methods()}")
    return _REGISTRY[method](**options)
