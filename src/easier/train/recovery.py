"""Recovery after a removal in fewer steps: early stop on a validation subset, distillation.

The loop fine-tunes a fixed budget after each removal. :class:`Recovery` adds two levers:

- **early stop**: every ``early_stop_every`` optimizer steps, score the model on the first
  ``early_stop_batches`` validation batches and stop once it is back within ``delta`` of the
  dense model's accuracy *on the same batches* (minus ``early_stop_margin`` of slack given
  back). The batches are read once, so a check is a few eval forwards and moves no RNG. The
  accept/reject decision after fine-tuning stays the full validation set's.
- **distillation** (Hinton et al., 2015): the teacher is the dense model before any removal,
  frozen; the loss is ``(1 - w) * CE(student, y) + w * T^2 * KL(p_teacher^T || p_student^T)``
  with ``p^T = softmax(logits / T)``. The T^2 keeps the soft term's gradients on the scale of
  the hard term's as T changes.

The teacher is written once to the run directory (``teacher.pt``, atomically, with its
sha256), so a resumed run distils from, and compares against, the same dense model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from easier.entropy.estimate import batch_input
from easier.errors import ConfigError, StateError, check_fields
from easier.graph.capture import call_model, logits_of, to_device
from easier.io.records import load_model, save_model
from easier.io.rundir import RunDir
from easier.parallel.collectives import any_failed
from easier.parallel.loaders import make_loader, targets
from easier.train.objective import IGNORE_INDEX, align, hits

__all__ = ["TEACHER_FILE", "EarlyStop", "Recovery", "distill_loss", "load_teacher",
           "recovery_hooks", "subset_accuracy", "teacher_of"]

TEACHER_FILE = "teacher.pt"


@dataclass(frozen=True)
class Recovery:
    """How fine-tuning after each removal recovers: early stop and knowledge distillation.

    ``early_stop_every=N`` checks every N optimizer steps (None: run the whole budget);
    ``early_stop_batches`` is the size of the validation subset, in fine-tune batches;
    ``early_stop_margin`` (points) asks the subset for that much more than ``baseline - delta``.
    ``distill`` is the weight w of the distillation term (0: plain cross-entropy) and
    ``temperature`` its T. ``finish_on_reject``: a fine-tune that stopped early but whose model
    then fails the full validation check trains on for the rest of its budget and is checked
    again before it is rejected, so early stop never rejects a removal sooner than the full
    budget would have (the subset can say "recovered" when the full set does not).
    """

    early_stop_every: int | None = None
    early_stop_batches: int = 4
    early_stop_margin: float = 0.0
    distill: float = 0.0
    temperature: float = 4.0
    finish_on_reject: bool = True

    def __post_init__(self) -> None:
        for name, low, optional in (("early_stop_every", 1, True),
                                    ("early_stop_batches", 1, False)):
            v = getattr(self, name)
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"Recovery.{name}={v!r}: must be an integer >= {low}"
                                  + (" or None" if optional else ""))
        if not isinstance(self.finish_on_reject, bool):
            raise ConfigError(f"Recovery.finish_on_reject={self.finish_on_reject!r}: must be "
                              "True or False")
        _number("early_stop_margin", self.early_stop_margin, low=0.0)
        _number("distill", self.distill, low=0.0, high=1.0)
        _number("temperature", self.temperature, low=0.0, strict=True)

    @property
    def early_stop(self) -> bool:
        return self.early_stop_every is not None

    @property
    def active(self) -> bool:
        """Whether it changes anything (an inactive Recovery is today's fixed budget)."""
        return self.early_stop or self.distill > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def steps_left(self, ft: Any) -> int:
        """Optimizer steps of the budget still to train before a removal may be rejected: the
        rest of the budget after an early stop (with ``finish_on_reject``), else 0."""
        if not (self.finish_on_reject and ft.stopped_early):
            return 0
        return max(0, ft.budget - ft.steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recovery:
        check_fields(cls, d)
        # a run recorded before finish_on_reject existed resumes as it was made
        return cls(**{"finish_on_reject": False, **d})


def _number(name: str, v: Any, *, low: float, high: float = math.inf,
            strict: bool = False) -> None:
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (v > low if strict else v >= low) and v <= high)
    if not ok:
        bound = (f"> {low:g}" if strict else f">= {low:g}") + (
            f" and <= {high:g}" if math.isfinite(high) else "")
        raise ConfigError(f"Recovery.{name}={v!r}: must be a finite number {bound}")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, *,
                 weight: float, temperature: float, x: Any = None) -> torch.Tensor:
    """(1 - w) * CE(student, y) + w * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
    the KL averaged over the batch (Hinton et al., 2015); per-token targets are scored per
    token (:mod:`easier.objective`)."""
    t = temperature
    student, y, teacher = align(student, y, x, teacher)
    hard = F.cross_entropy(student, y, ignore_index=IGNORE_INDEX)
    soft = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True)
    return (1.0 - weight) * hard + weight * t * t * soft


class Distill:
    """A ``loss_fn`` for :func:`easier.train.finetune.fine_tune`: the teacher's logits on the same
    input, under no_grad, turned into :func:`distill_loss`."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float):
        self.teacher, self.weight, self.temperature = teacher, weight, temperature

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, x: Any) -> torch.Tensor:
        with torch.no_grad():
            t = logits_of(call_model(self.teacher, x)).float()
        return distill_loss(logits, t, y, weight=self.weight, temperature=self.temperature, x=x)


def subset_accuracy(model: nn.Module, batches: list[tuple[Any, torch.Tensor]]) -> float:
    """Top-1 accuracy in % of ``model`` (eval mode, no grad) on pre-read batches; the model's
    mode is restored."""
    was = model.training
    model.eval()
    correct = seen = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                hit, counted = hits(logits_of(call_model(model, x)), y, x)
                correct += hit
                seen += counted
    finally:
        model.train(was)
    return 100.0 * correct / max(seen, 1)


def read_subset(val: Any, n_batches: int, batch_size: int, device: torch.device | str,
                input_key: Any) -> list[tuple[Any, torch.Tensor]]:
    """The first ``n_batches`` batches of ``val`` in order, on ``device``: the check's subset."""
    out: list[tuple[Any, torch.Tensor]] = []
    for batch in make_loader(val, batch_size, shuffle=False):
        if len(out) == n_batches:
            break
        out.append((to_device(batch_input(batch, input_key), device),
                    targets(batch).to(device)))
    return out


class EarlyStop:
    """A ``stop_check`` for :func:`easier.train.finetune.fine_tune`: True at the first multiple of
    ``every`` steps where the subset accuracy is >= ``floor``. ``checks`` logs (step, acc)."""

    def __init__(self, batches: list[tuple[Any, torch.Tensor]], every: int, floor: float):
        self.batches, self.every, self.floor = batches, every, floor
        self.checks: list[tuple[int, float]] = []

    def __call__(self, model: nn.Module, steps: int) -> bool:
        if steps % self.every:
            return False
        acc = subset_accuracy(model, self.batches)
        self.checks.append((steps, acc))
        # every rank must stop at the same step: stop only when no rank is short
        return not any_failed(acc < self.floor)


@dataclass
class RecoveryHooks:
    """What the loop hands to each fine-tune: a loss (or None) and a fresh early stop."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None
    subset: list[tuple[Any, torch.Tensor]]
    every: int | None
    floor: float
    baseline_subset_acc: float | None

    def stop_check(self) -> EarlyStop | None:
        return None if self.every is None else EarlyStop(self.subset, self.every, self.floor)


def recovery_hooks(cfg: Recovery, teacher: nn.Module | None, val: Any, *, delta: float,
                   batch_size: int, device: torch.device | str,
                   input_key: Any) -> RecoveryHooks:
    """The loss and early-stop settings of ``cfg`` for a run whose dense model is ``teacher``.

    The subset's floor is the teacher's accuracy on the same subset minus ``delta`` plus the
    margin, so the subset is compared with itself, not with the full validation set."""
    if cfg.active and teacher is None:
        raise ConfigError("Recovery needs the dense model (teacher) of the run")
    loss_fn = (Distill(teacher, cfg.distill, cfg.temperature)
               if cfg.distill > 0 and teacher is not None else None)
    if not cfg.early_stop or teacher is None:
        return RecoveryHooks(loss_fn, [], None, math.inf, None)
    subset = read_subset(val, cfg.early_stop_batches, batch_size, device, input_key)
    base = subset_accuracy(teacher, subset)
    return RecoveryHooks(loss_fn, subset, cfg.early_stop_every,
                         base - delta + cfg.early_stop_margin, base)


def teacher_of(model: nn.Module, run: RunDir | None, *, write: bool) -> nn.Module:
    """A frozen eval-mode copy of the dense ``model``; written to ``run`` when ``write``."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if run is not None and write:
        save_model(teacher, run.file(TEACHER_FILE))
    return teacher


def load_teacher(run: RunDir, base: nn.Module, device: torch.device | str) -> nn.Module:
    """The dense model saved when the run started (checked against its sha256), frozen."""
    path = run.file(TEACHER_FILE)
    if not path.is_file():
        raise StateError(f"{path} is missing: this run distils from or compares against its "
                         "dense model, which was saved there when it started; restore the "
                         "file or start a new run")
    return load_model(path, copy.deepcopy(base)).to(device).eval().requires_grad_(False)
