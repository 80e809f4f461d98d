"""The one base of every settings object: checked when built, plain data on disk.

A config is a frozen dataclass whose fields declare their rule (:func:`setting`): an integer
with a lower bound, a finite number in a range, a flag, a choice, a tuple. Construction checks
every field the same way and raises :class:`~easier.errors.ConfigError` naming
``Class.field``; ``to_dict``/``from_dict`` round-trip through JSON (unknown keys are refused, so
a typo or a newer easier's key is never dropped silently). Fields that are not data (a callback)
say so with ``stored=False`` and are left out of ``to_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from easier.errors import ConfigError

__all__ = ["Config", "Rule", "positive_int", "setting"]

C = TypeVar("C", bound="Config")


@dataclass(frozen=True)
class Rule:
    """What one field accepts. ``kind``: int, number, flag, choice, tuple, text or any."""

    kind: str = "any"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    optional: bool = False  # None allowed
    choices: tuple[Any, ...] = ()
    item: Callable[[Any], Any] | None = None  # converts each tuple item (e.g. int)
    stored: bool = True
    high_open: bool = False  # high itself is not allowed

    def describe(self) -> str:
        if self.kind == "flag":
            return "must be True or False"
        if self.kind == "choice":
            return f"valid: {list(self.choices)}"
        what = {"int": "an integer", "number": "a finite number", "tuple": "a list",
                "text": "a string"}.get(self.kind, "a value")
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return f"must be {what}{' ' + ' and '.join(bounds) if bounds else ''}" + (
            " or None" if self.optional else "")

    def check(self, value: Any) -> Any:
        """The value to store (tuples normalised), or raise ValueError."""
        if value is None and self.optional:
            return None
        k = self.kind
        if k == "flag":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if k == "choice":
            if value not in self.choices:
                raise ValueError
            return value
        if k == "text":
            if not isinstance(value, str):
                raise ValueError
            return value
        if k == "tuple":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError
            items = tuple(value)
            return tuple(self.item(v) for v in items) if self.item else items
        if k in ("int", "number"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError
            if k == "int" and not isinstance(value, int):
                raise ValueError
            if not math.isfinite(value):
                raise ValueError
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                raise ValueError
            if self.high is not None and (value > self.high
                                          or (self.high_open and value == self.high)):
                raise ValueError
            return value
        return value


def positive_int(value: Any) -> int:
    """An integer >= 1 (a batch size), for ``item=`` of a tuple setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError
    return value


def setting(default: Any = dataclasses.MISSING, *, kind: str = "any", low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False,
            optional: bool = False, choices: Sequence[Any] = (),
            item: Callable[[Any], Any] | None = None, stored: bool = True,
            factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its :class:`Rule` (the one place a config says what it accepts)."""
    rule = Rule(kind, low, high, low_open, optional, tuple(choices), item, stored, high_open)
    # what is not stored (a callback, a device) is not part of the settings' identity either
    extra: dict[str, Any] = {} if stored else {"compare": False, "repr": False}
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule}, **extra)
    return field(default=default, metadata={"rule": rule}, **extra)


@dataclass(frozen=True)
class Config:
    """Base class: subclasses are ``@dataclass(frozen=True)`` with :func:`setting` fields and
    may add cross-field checks in :meth:`check`."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            if rule is None:
                continue
            value = getattr(self, f.name)
            try:
                value = rule.check(value)
            except (ValueError, TypeError):
                raise ConfigError(f"{owner}.{f.name}={value!r}: {rule.describe()}") from None
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field checks of a subclass (raise ConfigError naming ``Class.field``)."""

    def to_dict(self) -> dict[str, Any]:
        """The stored fields as JSON-ready data (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            if rule is not None and not rule.stored:
                continue
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Rebuild from :meth:`to_dict` output; unknown keys raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got "
                              f"{type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid: "
                              f"{sorted(known)}")
        return cls(**d)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
