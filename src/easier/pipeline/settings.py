"""The settings of :func:`easier.reduce`, grouped by what they govern.

``reduce(model, train, val, stop=StopRule(...), entropy=EntropyConfig(...), run=RunConfig(...))``
in the style of torchao's ``quantize_(model, config)``: each object is small, frozen, checked
when built (a bad value raises :class:`ConfigError` naming the field) and written to the run's
config.json, so a resumed run sees a changed setting. Fine-tuning budgets stay
:class:`easier.FineTune` objects (``finetune=``, ``pretrain=``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from easier.edit.switches import MODES as LINEARIZE_MODES
from easier.errors import ConfigError
from easier.graph.sites import KINDS

__all__ = ["EntropyConfig", "RunConfig", "StopRule", "from_legacy"]


def _count(owner: str, name: str, value: Any, low: int, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{owner}.{name}={value!r}: must be an integer >= {low}"
                          + (" or None" if optional else ""))


def _flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name}={value!r}: must be True or False")


@dataclass(frozen=True)
class StopRule:
    """When the loop stops, and how many units one iteration removes.

    The loop stops when validation top-1 falls below ``baseline - delta`` (percentage points),
    once ``max_removals`` units are gone, after ``max_iterations`` iterations (methods such as
    EGP may remove nothing in a round), or when no unit is left. ``run_all`` keeps going to the
    last unit and logs everything (the returned model is still the last one accepted before the
    first rejection). ``one_shot=K`` removes the K lowest-scored units from one measurement and
    fine-tunes once. ``max_removals``, ``max_iterations`` and ``run_all`` are budgets: a resumed
    run may raise them.
    """

    delta: float = 1.0
    max_removals: int | None = None
    max_iterations: int | None = None
    run_all: bool = False
    one_shot: int | None = None

    def __post_init__(self) -> None:
        if (isinstance(self.delta, bool) or not isinstance(self.delta, (int, float))
                or not math.isfinite(self.delta) or self.delta < 0):
            raise ConfigError(f"StopRule.delta={self.delta!r}: the allowed accuracy drop must be "
                              "a finite number of points >= 0")
        _count("StopRule", "max_removals", self.max_removals, 0)
        _count("StopRule", "max_iterations", self.max_iterations, 0)
        _count("StopRule", "one_shot", self.one_shot, 1)
        _flag("StopRule", "run_all", self.run_all)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EntropyConfig:
    """Which activation sites are candidates, and how the entropy pass measures them.

    ``batches`` caps the batches of ``train_eval`` per entropy pass (None: all of it); ``kinds``
    selects the activation kinds that are sites (see :data:`easier.KINDS`); ``fold_ready``
    relocates zero padding when a site is linearized so that the result can be folded exactly.
    ``linearize`` is what a removed site computes: ``"identity"`` (the paper) or ``"affine"``,
    the per-channel least-squares ``a * z + b`` fitted to the activation on training batches
    (see :mod:`easier.affine`); both fold exactly.
    """

    batches: int | None = None
    kinds: tuple[str, ...] = KINDS
    fold_ready: bool = True
    linearize: str = "identity"

    def __post_init__(self) -> None:
        _count("EntropyConfig", "batches", self.batches, 1)
        if isinstance(self.kinds, str) or not isinstance(self.kinds, Sequence):
            raise ConfigError(f"EntropyConfig.kinds={self.kinds!r}: must be a tuple of kinds "
                              f"from {list(KINDS)}")
        kinds = tuple(self.kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if not kinds or unknown:
            raise ConfigError(f"EntropyConfig.kinds={kinds!r}: "
                              + (f"unknown kind(s) {unknown}" if unknown else "empty")
                              + f"; valid kinds: {list(KINDS)}")
        object.__setattr__(self, "kinds", kinds)
        _flag("EntropyConfig", "fold_ready", self.fold_ready)
        if self.linearize not in LINEARIZE_MODES:
            raise ConfigError(f"EntropyConfig.linearize={self.linearize!r}: valid modes: "
                              f"{list(LINEARIZE_MODES)}")


@dataclass(frozen=True)
class RunConfig:
    """How the run executes and talks: seed, device, mixed precision, batches, output.

    ``input_key`` says how every pass reads a dict batch (see
    :func:`easier.entropy.estimate.batch_input`).
    ``verbose`` logs one line per iteration (site removed, val top-1, kept or rejected, time)
    to ``log`` when given, else to the ``easier`` logger (to stderr when the application has
    configured no logging); ``progress`` adds per-batch progress bars. ``extra`` adds entries
    (e.g. model and data names) to the run's config.json. ``keep_iterations`` also saves every
    evaluated iteration's model, rejected ones included, as ``iterations/iter_KKK.pt`` in the
    run directory (:func:`easier.io.records.load_iteration`), so each can be folded and timed later
    (:mod:`easier.fronts`); it costs one checkpoint per iteration on disk.
    """

    seed: int = 0
    device: str | torch.device = "cpu"
    amp: bool = False
    input_key: str | Sequence[str] | None = None
    verbose: bool = True
    progress: bool = False
    log: Callable[[str], None] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    keep_iterations: bool = False

    def __post_init__(self) -> None:
        _count("RunConfig", "seed", self.seed, 0, optional=False)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"RunConfig.device={self.device!r}: not a torch device "
                              "(e.g. 'cpu', 'cuda', 'cuda:1')") from exc
        for name in ("amp", "verbose", "progress", "keep_iterations"):
            _flag("RunConfig", name, getattr(self, name))
        key = self.input_key
        if key is not None and not isinstance(key, str) and not (
                isinstance(key, Sequence) and key and all(isinstance(k, str) for k in key)):
            raise ConfigError(f"RunConfig.input_key={key!r}: must be a batch key, a list of "
                              "keys, or None")
        if self.log is not None and not callable(self.log):
            raise ConfigError(f"RunConfig.log={self.log!r}: must be a callable taking one line")
        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"RunConfig.extra={self.extra!r}: must be a dict of JSON values")


# The keywords reduce() took before the configs, and where each one lives now.
_LEGACY: dict[str, tuple[str, str]] = {
    "delta": ("stop", "delta"), "max_removals": ("stop", "max_removals"),
    "max_iterations": ("stop", "max_iterations"), "run_all": ("stop", "run_all"),
    "one_shot": ("stop", "one_shot"), "entropy_batches": ("entropy", "batches"),
    "kinds": ("entropy", "kinds"), "fold_ready": ("entropy", "fold_ready"),
    "seed": ("run", "seed"), "device": ("run", "device"), "amp": ("run", "amp"),
    "input_key": ("run", "input_key"), "progress": ("run", "progress"), "log": ("run", "log"),
    "config": ("run", "extra"),
}
_CLASSES = {"stop": StopRule, "entropy": EntropyConfig, "run": RunConfig}


def from_legacy(legacy: Mapping[str, Any], stop: StopRule | None, entropy: EntropyConfig | None,
                run: RunConfig | None) -> tuple[StopRule, EntropyConfig, RunConfig]:
    """The three configs, with old-style keywords (``delta=``, ``seed=``...) folded in.

    An old keyword still works but warns (DeprecationWarning) naming its new home; an unknown
    keyword raises :class:`ConfigError`.
    """
    legacy = {k: v for k, v in legacy.items() if not (k == "config" and v is None)}
    configs: dict[str, Any] = {"stop": stop or StopRule(), "entropy": entropy or EntropyConfig(),
                               "run": run or RunConfig()}
    unknown = sorted(k for k in legacy if k not in _LEGACY)
    if unknown:
        raise ConfigError(f"reduce() got unknown keyword(s) {unknown}; its settings are "
                          "stop=StopRule(...), entropy=EntropyConfig(...), run=RunConfig(...), "
                          "finetune=/pretrain=FineTune(...)")
    if legacy:
        moves = ", ".join(f"{k}= -> {_LEGACY[k][0]}={_CLASSES[_LEGACY[k][0]].__name__}"
                          f"({_LEGACY[k][1]}=...)" for k in legacy)
        warnings.warn(f"reduce(): old keyword(s) are deprecated: {moves}", DeprecationWarning,
                      stacklevel=3)
    for group in configs:
        changes = {_LEGACY[k][1]: v for k, v in legacy.items() if _LEGACY[k][0] == group}
        if changes:
            configs[group] = dataclasses.replace(configs[group], **changes)
    return configs["stop"], configs["entropy"], configs["run"]
