"""Exceptions raised by easier. Every message says what was wrong and what to do."""

from __future__ import annotations


class EasierError(Exception):
    """Base class of every error raised on purpose by easier."""


class NoSitesError(EasierError):
    """The model has no activation call site of the kinds looked for."""


class SiteError(EasierError, KeyError):
    """A site name is unknown, or the operation does not apply to that site."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class TraceError(EasierError):
    """torch.fx could not trace the model."""


class NonFiniteError(EasierError, FloatingPointError):
    """A NaN or Inf reached a place where it makes the result meaningless."""


class DataError(EasierError, ValueError):
    """A dataset, batch or path is not what was expected."""


class ConfigError(EasierError, ValueError):
    """An option, name or configuration is invalid or conflicts with a saved run."""


class StateError(EasierError):
    """A run directory's saved state is missing, corrupt or belongs to another run."""


class UserCodeError(EasierError):
    """The user's own ``--model`` or ``--data`` callable raised (its own error, not easier's)."""


class FoldError(EasierError):
    """A fold did not reproduce the original function within tolerance."""


def check_fields(cls: type, d: dict) -> None:
    """ConfigError naming every key of ``d`` that is not a field of dataclass ``cls`` (a config
    read back from JSON: a typo or a newer easier's key must not be dropped silently)."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(known)}")
