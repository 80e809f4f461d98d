"""A short regularised training before a method's first ranking, when the run did none.

LaCoOT ranks blocks by a distance its regularizer shrinks, and Layer Folding ranks sites by
slopes only training moves (all start at 0). Both papers train with their term before ranking;
from a checkpoint (``reduce`` without ``pretrain``) nothing did, so the ranking would be of an
unregularised network (LaCoOT) or a tie broken by model order (Layer Folding). The loop calls
``after_step`` after every optimizer step it runs, so a method counting those calls knows
whether its regularizer has ever been trained; if not, :func:`warm_up` trains a copy of the
model first, on ``ctx.train_eval`` (the un-augmented training images: the only training data
a :class:`~easier.methods.base.Context` carries), with plain SGD at a constant learning rate
and no weight decay (as Layer Folding's pre-fold script).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from easier.errors import ConfigError, NonFiniteError
from easier.methods.base import Context
from easier.train.finetune import FineTune, fine_tune

__all__ = ["Warmup", "warm_up"]


@dataclass(frozen=True)
class Warmup:
    """The regularised training budget: ``epochs`` at ``lr`` (``max_steps`` caps the steps).

    ``epochs=0`` turns it off: a method then refuses to rank an untrained network.
    """

    epochs: int = 1
    lr: float = 0.01
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"warmup_epochs={self.epochs!r}: need an integer >= 0")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"warmup_lr={self.lr!r}: need a number > 0")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
            or self.max_steps < 1
        ):
            raise ConfigError(f"warmup_steps={self.max_steps!r}: need None or an integer >= 1")

    def options(self) -> dict[str, Any]:
        return {"warmup_epochs": self.epochs, "warmup_lr": self.lr,
                "warmup_steps": self.max_steps}


def warm_up(
    model: nn.Module,
    ctx: Context,
    budget: Warmup,
    regularizer: Callable[[nn.Module], torch.Tensor] | None,
    after_step: Callable[[nn.Module], None],
    what: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """A trained copy of ``model`` and what the training did (for the history record).

    ``what`` names the method and what it needs, for the error raised when ``budget`` is 0 or
    there is no training data. Seeds come from ``ctx.rng`` and torch's global RNG is restored
    afterwards, so a resumed run repeats the same training.
    """
    if budget.epochs == 0:
        raise ConfigError(
            f"{what}, but this run did no training with it (no pretrain= / --pretrain-epochs "
            "and warmup_epochs=0): pass pretrain=FineTune(...), or warmup_epochs >= 1"
        )
    if ctx.train_eval is None:
        raise ConfigError(f"{what}: pass training data (train_eval) to train it first")
    cfg = FineTune(epochs=budget.epochs, lr=budget.lr, momentum=0.9, weight_decay=0.0,
                   schedule="constant", batch_size=ctx.batch_size, max_steps=budget.max_steps)
    seed = ctx.rng.getrandbits(31)
    trained = copy.deepcopy(model)
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        res = fine_tune(trained, ctx.train_eval, cfg, seed=seed, device=ctx.device,
                        input_key=ctx.input_key, regularizer=regularizer, after_step=after_step,
                        progress=ctx.progress, desc="warm-up")
    if res.failed:
        raise NonFiniteError(f"{what}: the warm-up training failed ({res.failed}); lower warmup_lr")
    return trained, {"epochs": res.epochs, "steps": res.steps, "loss": res.loss,
                     "accuracy": res.accuracy, "lr": budget.lr}
