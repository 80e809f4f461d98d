"""EASIER: linearize the site whose ON/OFF state has the lowest entropy (Quétu et al., 2024)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from easier.entropy.estimate import EntropyReport, batch_input, model_device
from easier.entropy.train_counts import TrainCounts
from easier.errors import ConfigError
from easier.graph.capture import call_model, to_device
from easier.methods.base import Context, SiteMethod, Step, register_method

WHEN = ("eval", "train-epoch")


@register_method
class Easier(SiteMethod):
    """Lowest layer entropy first; ties go to the earlier site.

    ``also_zero=True`` also removes every other site whose entropy is exactly 0 in the same
    iteration, as the reference code does.

    ``entropy_during`` says when the ON/OFF states are counted. ``"eval"`` (default): a pass in
    eval mode over the un-augmented training images after fine-tuning — a fixed model, running
    BN statistics. ``"train-epoch"``: during training, as the reference code does — train mode
    (batch statistics, dropout), augmented data, weights moving — over the batches of the last
    training run (pretraining, then each fine-tune; ``window`` keeps only the last N batches).
    When nothing was trained yet (a run from a checkpoint), the first measurement is a
    train-mode pass over the training images without weight updates, on a copy of the model.
    Module sites only (functional ``F.relu`` calls cannot be hooked on the eager model).
    """

    name = "easier"
    description = "lowest layer entropy first (the paper)"

    def __init__(self, also_zero: bool = False, entropy_during: str = "eval",
                 window: int | None = None):
        if entropy_during not in WHEN:
            raise ConfigError(f"entropy_during={entropy_during!r}; valid: {list(WHEN)}")
        self.also_zero = also_zero
        self.entropy_during = entropy_during
        self.window = window
        self._counts: TrainCounts | None = None

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"also_zero": self.also_zero}
        if self.entropy_during != "eval":  # keeps configs of existing runs unchanged
            opts.update(entropy_during=self.entropy_during, window=self.window)
        return opts

    def regularizer(self) -> Callable[[nn.Module], torch.Tensor] | None:
        if self.entropy_during == "eval":
            return None
        return self._train_counts()  # type: ignore[return-value]  (adds 0 to the loss)

    def _train_counts(self) -> TrainCounts:
        if self._counts is None:
            self._counts = TrainCounts(self.example, window=self.window)
        return self._counts

    def score(self, ctx: Context) -> dict[str, float]:
        if self.entropy_during == "eval":
            report = ctx.entropy()
        else:
            report = ctx.report = self._measured_in_training(ctx)
        return {n: report[n] for n in ctx.remaining}

    def _measured_in_training(self, ctx: Context) -> EntropyReport:
        counts = self._train_counts()
        if counts.batches == 0:  # nothing trained yet: one train-mode pass, weights frozen
            from easier.train.finetune import make_loader

            probe = copy.deepcopy(ctx.model).train()  # its BN statistics may move: a copy
            counts.example = self.example if self.example is not None else ctx.example
            handle = counts.attach(probe)
            try:
                with torch.no_grad():
                    loader = make_loader(ctx.train_eval, ctx.batch_size, shuffle=True,
                                         seed=ctx.iteration)
                    for i, batch in enumerate(loader):
                        if ctx.entropy_batches is not None and i >= ctx.entropy_batches:
                            break
                        call_model(probe, to_device(batch_input(batch, ctx.input_key),
                                                    model_device(probe)))
                        counts(probe)
            finally:
                handle.remove()
        report = counts.report()
        missing = [n for n in ctx.remaining if n not in report]
        if missing:
            raise ConfigError(f"entropy_during='train-epoch': sites {missing} were not seen "
                              "during training (were they called in train mode?)")
        return report

    def state_dict(self) -> dict[str, Any]:
        return {} if self._counts is None else {"train_counts": self._counts.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_counts" in state:
            self._train_counts().load_state_dict(state["train_counts"])

    def step(self, ctx: Context) -> Step:
        step = super().step(ctx)
        if self.also_zero:
            extra = [n for n in ctx.remaining if step.scores[n] == 0.0 and n not in step.chosen]
            if extra:
                chosen = step.chosen + extra
                return Step(ctx.linearize(chosen), chosen, step.scores, "lowest entropy + zeros")
        return step
