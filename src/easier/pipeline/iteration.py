"""One iteration of the loop, and the parts of a run that stay fixed while it iterates.

:func:`iterate` is the body of :func:`easier.reduce`'s loop: the method chooses and edits
(``method.step``), the model is fine-tuned, evaluated and accepted or not, and the state is
saved. When an early stop said "recovered" but the full validation set disagrees, the rest of
the budget is trained before the removal is rejected.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from easier.errors import ConfigError
from easier.io.rundir import RunDir
from easier.methods import Context, Method
from easier.pipeline.confidence import paired_bootstrap, standard_error
from easier.pipeline.scores import cost_of, evaluate_all, limit_reason, val_size
from easier.pipeline.settings import Settings
from easier.pipeline.state import RunState
from easier.report.progress import status_line
from easier.train.correct import per_sample_correct
from easier.train.finetune import TrainResult, fine_tune, seed_everything
from easier.train.recovery import RecoveryHooks

__all__ = ["Run", "iterate"]


@dataclass
class Run:
    """What stays fixed during one reduce call."""

    strategy: Method
    settings: Settings
    data: dict[str, Any]  # train, val, test, train_eval
    device: torch.device
    example: Any
    base: nn.Module  # the architecture saved states are rebuilt into
    prepared: nn.Module  # the user's model as the method prepared it (iteration 0 of a new run)
    cfg: dict[str, Any]
    rundir: RunDir | None
    say: Callable[[str], None]
    hooks: RecoveryHooks | None = None

    def train_kw(self) -> dict[str, Any]:
        run = self.settings.run
        return {"device": self.device, "input_key": run.input_key, "progress": run.progress,
                "amp": run.amp, "regularizer": self.strategy.regularizer(),
                "after_step": self.strategy.after_step}

    def scores(self, model: nn.Module) -> dict[str, Any]:
        """Val/test loss and top-1, and the standard error of val top-1 in points (the noise
        every δ decision is made against; None when the val set has no length)."""
        out = evaluate_all(model, self.data["val"], self.data["test"], self.device,
                           self.settings.run.input_key)
        n = val_size(self.data["val"])
        out["val_se"] = None if n is None else standard_error(out["val_acc"], n)
        return out


def iterate(r: Run, state: RunState) -> None:
    """One iteration: choose and edit, fine-tune, evaluate, accept or stop, save."""
    s, k = r.settings, state.history[-1]["iteration"] + 1
    removed = state.removed
    remaining = [u for u in r.strategy.units(state.current, s.entropy.kinds) if u not in removed]
    reason, code = limit_reason(s.stop, k, len(removed), remaining, r.strategy.unit)
    if reason is not None:
        state.stop(code, reason)
        return
    t0 = time.perf_counter()
    ctx = _context(r, state, k, removed, remaining)
    step = r.strategy.step(ctx)
    if ctx.max_k is not None and len(step.chosen) > ctx.max_k:
        raise ConfigError(f"method {r.strategy.name!r} chose {len(step.chosen)} {r.strategy.unit}s "
                          f"({', '.join(step.chosen)}) but max_removals={s.stop.max_removals} "
                          f"allows {ctx.max_k} more; the method must respect Context.max_k")
    candidate, t_step = step.model.to(r.device), time.perf_counter() - t0
    row = {"iteration": k, "chosen": step.chosen, "removed": removed + step.chosen,
           "entropy": ctx.report.as_dict() if ctx.report is not None else None,
           "scores": step.scores, "reason": step.reason, **step.info}
    ft, t_ft = _fine_tune(r, candidate, k, row)
    if ft.failed:
        row.update(accepted=False, meets_threshold=False,
                   seconds={"step": t_step, "finetune": t_ft, "total": t_step + t_ft})
        state.history.append(row)
        state.stop("failed", f"fine-tuning failed at iteration {k}: {ft.failed}; kept the "
                   "previous model")
        r.say(f"iter {k:>2} | {', '.join(step.chosen)} | {state.stop_reason}")
        return
    t2 = time.perf_counter()
    scores, ok, t_more = _judge(r, candidate, k, ft, state, row)
    row.update(scores, meets_threshold=ok, accepted=ok and not state.rejected,
               **cost_of(candidate, r.example))
    row["seconds"] = {"step": t_step, "finetune": t_ft + t_more,
                      "eval": time.perf_counter() - t2 - t_more,
                      "total": time.perf_counter() - t0}
    state.record(row, candidate)
    r.say(status_line(row, state.baseline, s.stop.delta))
    if not ok and not state.rejected:
        state.rejected = True
        if not s.stop.run_all:
            state.stop("rejected", _rejection(row, state.baseline, s.stop.delta))
    state.save(r.rundir, r.cfg, r.strategy)


def _context(r: Run, state: RunState, k: int, removed: list[str],
             remaining: list[str]) -> Context:
    """What the method sees in iteration ``k``."""
    s = r.settings
    left = None if s.stop.max_removals is None else s.stop.max_removals - len(removed)
    want = min(s.stop.one_shot or 1, len(remaining), *([left] if left is not None else []))
    return Context(model=state.current, remaining=remaining, removed=removed, k=want,
                   iteration=k, rng=random.Random(s.run.seed * 1_000_003 + k),
                   train_eval=r.data["train_eval"], val=r.data["val"], device=r.device,
                   kinds=s.entropy.kinds, fold_ready=s.edit.fold_ready,
                   batch_size=s.finetune.batch_size, entropy_batches=s.entropy.batches,
                   input_key=s.run.input_key, progress=s.run.progress, example=r.example,
                   linearize_mode=s.edit.linearize, max_k=left)


def _fine_tune(r: Run, model: nn.Module, k: int, row: dict[str, Any]) -> tuple[TrainResult,
                                                                                  float]:
    """Fine-tune after the edit of iteration ``k`` (with the recovery hooks); fills ``row``."""
    s = r.settings
    seed_everything(s.run.seed + k)
    t1 = time.perf_counter()
    assert r.hooks is not None
    check = r.hooks.stop_check()
    ft = (fine_tune(model, r.data["train"], s.finetune, seed=s.run.seed + 1000 * k,
                    desc=f"iter {k}", loss_fn=r.hooks.loss_fn, stop_check=check, **r.train_kw())
          if r.strategy.finetune else TrainResult())
    row.update(train_loss=None if ft.steps == 0 else ft.loss,
               train_acc=None if ft.steps == 0 else ft.accuracy, finetune_epochs=ft.epochs,
               finetune_steps=ft.steps, failed=ft.failed,
               finetune_stopped_early=ft.stopped_early,
               early_stop_checks=None if check is None else [list(c) for c in check.checks])
    return ft, time.perf_counter() - t1


def _rejection(row: dict[str, Any], baseline: dict[str, Any], delta: float) -> str:
    """Why a removal was rejected, with the noise the decision was made against."""
    boot = row.get("bootstrap")
    if boot is not None and row["val_acc"] >= baseline["val_acc"] - delta:
        return (f"val top-1 {row['val_acc']:.2f} is within delta {delta} of baseline "
                f"{baseline['val_acc']:.2f}, but the paired bootstrap's "
                f"{boot['confidence']:.0%} bound on the drop is {boot['upper']:.2f} points > "
                f"{delta}")
    se = baseline.get("val_se")
    return (f"val top-1 {row['val_acc']:.2f} < baseline {baseline['val_acc']:.2f} - delta "
            f"{delta}" + ("" if se is None else f" (val standard error ±{se:.2f} points)"))


def _within(r: Run, model: nn.Module, scores: dict[str, Any], state: RunState,
            row: dict[str, Any]) -> bool:
    """The δ rule: val top-1 within δ of the baseline, and with ``StopRule.confidence`` also
    the paired bootstrap's bound on the drop (recorded in ``row["bootstrap"]``)."""
    stop = r.settings.stop
    ok = scores["val_acc"] >= state.baseline["val_acc"] - stop.delta
    if stop.confidence is None or state.baseline_correct is None:
        return ok
    new = per_sample_correct(model, r.data["val"], r.device, r.settings.run.input_key)
    boot = paired_bootstrap(state.baseline_correct, new, stop.delta, stop.confidence,
                            stop.bootstrap_rounds, seed=r.settings.run.seed)
    row["bootstrap"] = {"confidence": stop.confidence, "p_within": boot.p_within,
                        "lower": boot.lower, "upper": boot.upper}
    return ok and boot.upper <= stop.delta


def _judge(r: Run, model: nn.Module, k: int, ft: TrainResult, state: RunState,
           row: dict[str, Any]) -> tuple[dict[str, Any], bool, float]:
    """(scores, within δ?, seconds of extra training): when an early stop said "recovered"
    and the full validation set says no, the rest of the budget is trained first."""
    s = r.settings
    scores = r.scores(model)
    ok = _within(r, model, scores, state, row)
    rest = 0 if ok else s.recovery.steps_left(ft)
    if not rest:
        return scores, ok, 0.0
    t3 = time.perf_counter()
    assert r.hooks is not None
    more = fine_tune(model, r.data["train"], replace(s.finetune, max_steps=rest),
                     seed=s.run.seed + 1000 * k + 500, desc=f"iter {k} (rest)",
                     loss_fn=r.hooks.loss_fn, **r.train_kw())
    row.update(finetune_steps=ft.steps + more.steps, finetune_continued=more.steps,
               failed=more.failed, early_stop_val_acc=scores["val_acc"])
    if not more.failed:
        scores = r.scores(model)
        ok = _within(r, model, scores, state, row)
    return scores, ok, time.perf_counter() - t3
