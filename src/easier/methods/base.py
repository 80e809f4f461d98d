"""The interface every depth-reduction method implements, and the method registry.

The loop in :mod:`easier.loop` is shared: train, evaluate, call ``method.step`` once per
iteration, fine-tune, evaluate, accept or stop, save, resume, fold. A method decides what one
iteration changes and may hook into training:

* ``prepare(model)``: transform the model once before anything is trained (e.g. add slopes);
* ``units(model)``: what is still removable (activation sites, blocks, ...);
* ``step(ctx)``: one iteration's change, returned as a :class:`Step` (new model + removed units);
* ``regularizer()``: a loss term added at every training step (pretraining and fine-tuning);
* ``after_step(model)``: called after every optimizer step (e.g. re-apply pruning masks);
* ``state_dict()`` / ``load_state_dict()``: the method's own state, saved for resume;
* ``finetune``: whether the loop fine-tunes after each step.

Every change to the model must go through a recorded edit (:func:`easier.linearize`,
:func:`easier.edit.linearize.replace_with_identity`, or an edit the method registers), or be a
change
of weights, so that checkpoints rebuild under ``weights_only=True``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from easier.edit.linearize import linearize
from easier.entropy.estimate import EntropyReport, batch_input, measure_entropy, model_device
from easier.errors import ConfigError
from easier.graph.capture import call_model, default_example, to_device
from easier.graph.sites import KINDS, find_sites
from easier.train.finetune import logits_of, targets
from easier.train.objective import cross_entropy, hits

__all__ = ["Context", "Method", "SiteMethod", "Step", "create_method", "list_methods",
           "method_descriptions", "register_method"]


@dataclass
class Context:
    """What a method may use in one iteration. Expensive things are computed on demand."""

    model: nn.Module
    remaining: list[str]  # units still removable, in model order
    removed: list[str]  # units removed so far, oldest first
    k: int  # how many units to remove now (1, or K in one-shot mode)
    iteration: int
    rng: random.Random  # seeded from (run seed, iteration): reproducible across resumes
    train_eval: Dataset | DataLoader | None = None  # training images, no augmentation
    val: Dataset | DataLoader | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    kinds: Sequence[str] = KINDS
    fold_ready: bool = True
    batch_size: int = 128
    entropy_batches: int | None = None
    input_key: str | None = None
    progress: bool = False
    report: EntropyReport | None = None  # set by entropy(); recorded in the history
    max_k: int | None = None  # units the budget still allows (max_removals); None = no limit
    example: Any = None  # one model input (on the device): what captures are made on
    linearize_mode: str = "identity"  # what a removed site computes (EntropyConfig.linearize)
    fit_batches: int = 8  # training batches an affine fit reads
    fits: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(model) -> affine fits

    def entropy(self, model: nn.Module | None = None, **options: Any) -> EntropyReport:
        """Entropy of the remaining sites on the training images (cached for ``ctx.model``)."""
        from easier.parallel import get_info, measure_entropy_distributed
        from easier.train.finetune import make_loader

        target = self.model if model is None else model
        if model is None and self.report is not None and not options:
            return self.report
        info = get_info()
        common = {"kinds": self.kinds, "input_key": self.input_key, "device": self.device,
                  "max_batches": self.entropy_batches, "progress": self.progress, **options}
        if info.enabled and not isinstance(self.train_eval, DataLoader):
            # each rank counts an exact shard; summed counts equal the single-process ones
            rep = measure_entropy_distributed(target, self.train_eval, self.batch_size, info,
                                              **common)
        else:
            rep = measure_entropy(target, make_loader(self.train_eval, self.batch_size,
                                                      shuffle=False), **common)
        if model is None and not options:
            self.report = rep
        return rep

    def linearize(self, sites: Sequence[str], model: nn.Module | None = None, *,
                  fold_ready: bool | None = None, capture: bool = True) -> nn.Module:
        """``ctx.model`` (or ``model``) with these sites linearized, padding moved if fold_ready.

        ``fold_ready`` overrides the run's setting (None): scoring a candidate with ``False``
        measures the removal alone, without the border change that padding relocation makes.
        ``capture=False`` (needs ``fold_ready=False``) skips the capture, to score candidates
        fast. In the run's ``affine`` mode the sites get their least-squares ``a * z + b``.
        """
        ready = self.fold_ready if fold_ready is None else fold_ready
        target = self.model if model is None else model
        example = to_device(self.example, model_device(target))
        fits = self.affine_fits(target) if self.linearize_mode == "affine" else None
        return linearize(target, list(sites), example_input=example if capture else None,
                         fold_ready=ready and capture and example is not None, kinds=self.kinds,
                         capture=capture, mode=self.linearize_mode, fits=fits)

    def affine_fits(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Least-squares ``a * z + b`` of every site of ``model`` (cached per model object).

        Fitted on the first ``fit_batches`` unshuffled training batches, so every rank of a
        distributed run fits the same values.
        """
        from easier.edit.affine import fit_affine
        from easier.train.finetune import make_loader

        target = self.model if model is None else model
        if id(target) not in self.fits:
            if self.train_eval is None:
                raise ConfigError("affine linearization fits on training data: pass train_eval")
            loader = make_loader(self.train_eval, self.batch_size, shuffle=False)
            self.fits[id(target)] = fit_affine(target, loader, max_batches=self.fit_batches,
                                               input_key=self.input_key, kinds=self.kinds)
        return self.fits[id(target)]

    def val_batches(self, n: int | None = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` validation batches (all when None), on the device."""
        from easier.train.finetune import make_loader

        out = []
        for i, batch in enumerate(make_loader(self.val, self.batch_size, shuffle=False)):
            if n is not None and i >= n:
                break
            out.append((to_device(batch_input(batch, self.input_key), self.device),
                        targets(batch).to(self.device)))
        return out

    @torch.no_grad()
    def loss(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean cross-entropy of ``model`` (eval mode) on the given batches."""
        was = model.training
        model.eval()
        try:
            total, seen = 0.0, 0
            for x, y in batches:
                logits = logits_of(call_model(model, x))
                total += float(cross_entropy(logits, y, x, reduction="sum"))
                seen += hits(logits, y, x)[1]
        finally:
            model.train(was)
        return total / max(1, seen)


@dataclass
class Step:
    """One iteration's change: the new model, the units it removed, and how they were ranked."""

    model: nn.Module
    chosen: list[str]  # units removed now (may be empty, e.g. a pruning round)
    scores: dict[str, float] = field(default_factory=dict)  # lower = removed first
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # extra fields for the history record


class Method:
    """Base class: subclass, set ``name``, implement :meth:`step`, decorate with register_method."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    unit: ClassVar[str] = "site"  # what one removed unit is, for reports
    finetune: ClassVar[bool] = True  # fine-tune after each step
    example: Any = None  # one model input, set by the loop: captures (sites) are made on it

    def __init__(self, **options: Any):
        if options:
            raise ConfigError(f"method {self.name!r} takes no options; got {sorted(options)}")

    def options(self) -> dict[str, Any]:
        """The method's options, recorded in the run's config (must be JSON-able)."""
        return {}

    def prepare(self, model: nn.Module) -> nn.Module:
        """Transform the model once, before any training. Default: unchanged."""
        return model

    def units(self, model: nn.Module, kinds: Sequence[str] = KINDS) -> list[str]:
        """The units still removable in ``model``. Default: its activation sites."""
        from easier.errors import NoSitesError

        try:
            example = to_device(self.example, model_device(model))
            if example is None:  # called outside the loop: capture from the model's spec
                example = default_example(model)
            return [s.name for s in find_sites(model, example, kinds=kinds)]
        except NoSitesError:
            return []

    def step(self, ctx: Context) -> Step:
        raise NotImplementedError

    def regularizer(self) -> Callable[[nn.Module], torch.Tensor] | None:
        """A loss term added at every training step, or None."""
        return None

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (pretraining and fine-tuning)."""

    def state_dict(self) -> dict[str, Any]:
        """The method's own state (tensors and plain data), saved after every iteration."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when a run resumes."""


class SiteMethod(Method):
    """A method that scores the remaining sites and linearizes the ``k`` lowest."""

    def score(self, ctx: Context) -> dict[str, float]:
        raise NotImplementedError

    def step(self, ctx: Context) -> Step:
        scores = self.score(ctx)
        order = {n: i for i, n in enumerate(ctx.remaining)}
        ranked = sorted(ctx.remaining, key=lambda n: (scores[n], order[n]))
        chosen = ranked[: ctx.k]
        return Step(ctx.linearize(chosen), chosen, scores, self.description)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ConfigError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_descriptions() -> dict[str, str]:
    """{name: one-line description} of every registered method, sorted by name."""
    return {n: _REGISTRY[n].description for n in sorted(_REGISTRY)}


def create_method(method: str | Method, **options: Any) -> Method:
    """A Method instance from a registered name (or the instance itself)."""
    if isinstance(method, Method):
        if options:
            raise ConfigError("pass options to the Method's constructor, not with an instance")
        return method
    if method not in _REGISTRY:
        raise ConfigError(f"unknown method {method!r}; valid methods: {list_methods()}")
    try:
        return _REGISTRY[method](**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {method!r}: {exc}") from exc
