"""The settings of :func:`easier.reduce`, grouped by what they govern.

``reduce(model, train, val, stop=StopRule(...), entropy=EntropyConfig(...), edit=EditConfig(...),
run=RunConfig(...))`` in the style of torchao's ``quantize_(model, config)``: each object is
small, frozen, checked when built (:class:`easier.config.Config`: a bad value raises
:class:`ConfigError` naming ``Class.field``) and written to the run's config.json, so a resumed
run sees a changed setting. Fine-tuning budgets are :class:`easier.FineTune` objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from easier.config import Config, setting
from easier.edit.switches import MODES as LINEARIZE_MODES
from easier.errors import ConfigError
from easier.graph.sites import KINDS
from easier.train.finetune import FineTune
from easier.train.recovery import Recovery

__all__ = ["EditConfig", "EntropyConfig", "RunConfig", "Settings", "StopRule"]


@dataclass(frozen=True)
class StopRule(Config):
    """When the loop stops, and how many units one iteration removes.

    The loop stops when validation top-1 falls below ``baseline - delta`` (percentage points),
    once ``max_removals`` units are gone, after ``max_iterations`` iterations (methods such as
    EGP may remove nothing in a round), or when no unit is left. ``run_all`` keeps going to the
    last unit and logs everything (the returned model is still the last one accepted before the
    first rejection). ``one_shot=K`` removes the K lowest-scored units from one measurement and
    fine-tunes once. ``max_removals``, ``max_iterations`` and ``run_all`` are budgets: a resumed
    run may raise them.

    ``confidence=c`` makes acceptance stricter than the point rule: a removal is kept only when
    a paired bootstrap of the val samples (``bootstrap_rounds`` resamples of which samples the
    dense and the new model get right) puts the drop within δ with probability ``c`` — its
    ``c`` quantile is <= δ. Single-label classification only (one class per sample).
    """

    delta: float = setting(1.0, kind="number", low=0.0)
    max_removals: int | None = setting(None, kind="int", low=0, optional=True)
    max_iterations: int | None = setting(None, kind="int", low=0, optional=True)
    run_all: bool = setting(False, kind="flag")
    one_shot: int | None = setting(None, kind="int", low=1, optional=True)
    confidence: float | None = setting(None, kind="number", low=0.0, high=1.0, low_open=True,
                                       high_open=True, optional=True)
    bootstrap_rounds: int = setting(2000, kind="int", low=1)


@dataclass(frozen=True)
class EntropyConfig(Config):
    """Which activation sites are candidates, and how much data the entropy pass reads.

    ``batches`` caps the batches of ``train_eval`` per entropy pass (None: all of it); ``kinds``
    selects the activation kinds that are sites (see :data:`easier.KINDS`).
    """

    batches: int | None = setting(None, kind="int", low=1, optional=True)
    kinds: tuple[str, ...] = setting(KINDS, kind="tuple", item=str)

    def check(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or unknown:
            raise ConfigError(f"EntropyConfig.kinds={list(self.kinds)!r}: "
                              + (f"unknown kind(s) {unknown}" if unknown else "empty")
                              + f"; valid kinds: {list(KINDS)}")


@dataclass(frozen=True)
class EditConfig(Config):
    """How a chosen site is edited.

    ``linearize`` is what a removed site computes: ``"identity"`` (the paper) or ``"affine"``,
    the per-channel least-squares ``a * z + b`` fitted to the activation on training batches
    (:mod:`easier.edit.affine`); both fold exactly. ``fold_ready`` relocates zero padding when a
    site is linearized so that a later fold merges conv chains exactly (:mod:`easier.edit.padding`).
    """

    linearize: str = setting("identity", kind="choice", choices=LINEARIZE_MODES)
    fold_ready: bool = setting(True, kind="flag")


def _device(value: Any) -> Any:
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError from exc
    return value


@dataclass(frozen=True)
class RunConfig(Config):
    """How the run executes and talks: seed, device, mixed precision, batches, output.

    ``input_key`` says how every pass reads a dict batch (see
    :func:`easier.entropy.estimate.batch_input`). ``verbose`` logs one line per iteration to
    ``log`` when given, else to the ``easier`` logger; ``progress`` adds per-batch progress bars.
    ``extra`` adds entries (e.g. model and data names) to the run's config.json.
    ``keep_iterations`` also saves every evaluated iteration's model, rejected ones included, as
    ``iterations/iter_KKK.pt`` (:func:`easier.io.records.load_iteration`), so each can be folded
    and timed later (:mod:`easier.pipeline.fronts`); it costs one checkpoint per iteration.
    """

    seed: int = setting(0, kind="int", low=0)
    device: str | torch.device = setting("cpu", stored=False)
    amp: bool = setting(False, kind="flag")
    input_key: str | Sequence[str] | None = setting(None, optional=True)
    verbose: bool = setting(True, kind="flag", stored=False)
    progress: bool = setting(False, kind="flag", stored=False)
    log: Callable[[str], None] | None = setting(None, optional=True, stored=False)
    extra: Mapping[str, Any] = setting(kind="any", factory=dict, stored=False)
    keep_iterations: bool = setting(False, kind="flag")

    def check(self) -> None:
        try:
            _device(self.device)
        except ValueError:
            raise ConfigError(f"RunConfig.device={self.device!r}: not a torch device "
                              "(e.g. 'cpu', 'cuda', 'cuda:1')") from None
        key = self.input_key
        if key is not None and not isinstance(key, str) and not (
                isinstance(key, Sequence) and key and all(isinstance(k, str) for k in key)):
            raise ConfigError(f"RunConfig.input_key={key!r}: must be a batch key, a list of "
                              "keys, or None")
        if self.log is not None and not callable(self.log):
            raise ConfigError(f"RunConfig.log={self.log!r}: must be a callable taking one line")
        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"RunConfig.extra={self.extra!r}: must be a dict of JSON values")


@dataclass(frozen=True)
class Settings:
    """Every setting of one :func:`easier.reduce` call; :meth:`to_config` is config.json."""

    stop: StopRule
    entropy: EntropyConfig
    edit: EditConfig
    run: RunConfig
    finetune: FineTune
    pretrain: FineTune | None
    recovery: Recovery

    def to_config(self, method: Any, facts: Mapping[str, Any]) -> dict[str, Any]:
        """The run's config.json: method, each settings group, facts about the model
        (sites, units, input shape, spec) and the caller's ``run.extra`` entries."""
        return {
            "method": method.name, "method_options": method.options(),
            "stop": self.stop.to_dict(), "entropy": self.entropy.to_dict(),
            "edit": self.edit.to_dict(), "run": self.run.to_dict(),
            "finetune": self.finetune.to_dict(),
            "pretrain": self.pretrain.to_dict() if self.pretrain else None,
            "recovery": self.recovery.to_dict() if self.recovery.active else None,
            **facts, **dict(self.run.extra),
        }
