"""The reduction loop (paper Fig. 1), shared by every method.

    (train) -> evaluate -> [ measure entropy -> method chooses -> linearize -> fine-tune
                             -> evaluate -> accept or stop ] -> repeat

The loop stops when validation top-1 falls below ``baseline - delta`` (percentage points), at
``max_removals``, or when no site is left; the returned model is the last one that met the
threshold. After every iteration the whole state is written atomically to the run directory,
so a killed run resumes from its last completed iteration and reaches the same result.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from easier.errors import ConfigError, NonFiniteError
from easier.graph.capture import to_device
from easier.graph.sites import find_sites
from easier.io.records import rebuild
from easier.io.rundir import RunDir, lock_run_dir_ranks
from easier.methods import Context, Method, create_method
from easier.pipeline.saving import save_progress
from easier.pipeline.scores import cost_of, evaluate_all, example_batch, limit_reason, num_classes
from easier.pipeline.settings import EntropyConfig, RunConfig, StopRule, from_legacy
from easier.report.outcome import near_chance
from easier.report.progress import status_line, talker
from easier.train.finetune import FineTune, TrainResult, fine_tune, seed_everything
from easier.train.recovery import Recovery, load_teacher, recovery_hooks, teacher_of

if TYPE_CHECKING:
    from easier.io.artifacts import FoldOptions

__all__ = ["EntropyConfig", "Recovery", "ReduceResult", "RunConfig", "StopRule", "reduce"]


# Budgets a resumed run may change: a run stopped by a limit continues when the limit grows.
_BUDGET_KEYS = ("max_removals", "max_iterations", "run_all")
_MUTABLE_KEYS = (*_BUDGET_KEYS, "model_file")  # ... and where the CLI found the user's file


@dataclass
class ReduceResult:
    """The reduced model (last accepted), the units it removed, and the per-iteration history.

    ``linearized`` lists the removed units (activation sites for most methods, blocks for
    LaCoOT); ``easier.linearized_sites(result.model)`` gives the linearized sites alone.
    """

    model: nn.Module
    linearized: list[str]
    history: list[dict[str, Any]]
    baseline: dict[str, Any]
    stop_reason: str
    out: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        from easier.report.files import history_table

        return history_table(self.history, self.baseline)


def reduce(
    model: nn.Module,
    train: Dataset | DataLoader,
    val: Dataset | DataLoader,
    *,
    method: str | Method = "easier",
    test: Dataset | DataLoader | None = None,
    train_eval: Dataset | DataLoader | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    stop: StopRule | None = None,
    entropy: EntropyConfig | None = None,
    run: RunConfig | None = None,
    finetune: FineTune | None = None,
    pretrain: FineTune | None = None,
    fold: str | FoldOptions | None = None,
    recovery: Recovery | None = None,
    **legacy: Any,
) -> ReduceResult:
    """Run a depth-reduction method end to end and return the reduced model.

    ``train`` is the (augmented) training data for fine-tuning; ``train_eval`` the same images
    without augmentation for the entropy pass (defaults to ``train``); ``test`` is only
    reported. ``stop`` (:class:`StopRule`) says when to stop, ``entropy``
    (:class:`EntropyConfig`) which sites are candidates and how they are measured, ``run``
    (:class:`RunConfig`) the seed, device, dict-batch key and logging; ``finetune`` is the
    budget after each removal and ``pretrain`` trains the dense model first (skip it for an
    already trained model). ``out`` is a run directory, held under an OS lock for the whole
    call (a second writer is refused, naming the holder's PID); ``resume=True`` continues a
    killed run. ``fold`` (a plan: "latency", "flops", "all", "none", or a
    :class:`~easier.io.artifacts.FoldOptions` naming the batch sizes the plan must hold for) folds
    the kept model at the end and writes folded.pt2, fold_plan.json and fold.md to ``out``.
    ``recovery`` (:class:`~easier.train.recovery.Recovery`) stops each fine-tune once a validation
    subset is back within ``delta`` and/or distils from the dense model.

    The keywords of easier <= 0.1 (``delta=``, ``max_removals=``, ``seed=``, ``device=``...)
    still work, with a DeprecationWarning naming the config field that replaces each: they map
    one to one, so breaking existing scripts would buy nothing.
    """
    stop, entropy, run = from_legacy(legacy, stop, entropy, run)
    if fold is not None and out is None:
        raise ConfigError("fold= needs out= (the folded model and plan are written there)")
    from easier.parallel import get_info

    with _writer_lock(out, get_info()):
        return _reduce(model, train, val, method, test, train_eval, out, resume, stop, entropy,
                       run, finetune or FineTune(), pretrain, fold, recovery or Recovery())


@contextlib.contextmanager
def _writer_lock(out: str | Path | None, info: Any) -> Iterator[None]:
    """The run directory's writer lock for every rank; nothing to lock without ``out``.
    Re-entrant: a caller that holds it already (the CLI) is fine."""
    if out is None:
        yield
        return
    with lock_run_dir_ranks(out, info):
        yield


def _reduce(model: nn.Module, train: Any, val: Any, method: str | Method, test: Any,
            train_eval: Any, out: str | Path | None, resume: bool, stop: StopRule,
            entropy: EntropyConfig, run: RunConfig, finetune: FineTune,
            pretrain: FineTune | None, fold: str | FoldOptions | None,
            recovery: Recovery) -> ReduceResult:
    from easier.data.checks import check_datasets  # empty splits, bad labels, NaN inputs: DataError
    from easier.parallel import barrier, get_info

    input_key, kinds, seed = run.input_key, entropy.kinds, run.seed
    check_datasets(train, val, test=test, train_eval=train_eval, model=model, input_key=input_key)
    strategy = create_method(method)
    info = get_info()
    say = talker(run.verbose, run.log, info.is_main)  # only rank 0 talks and writes
    device = torch.device(run.device)
    train_eval = train if train_eval is None else train_eval
    example = to_device(example_batch(val, input_key), device)
    strategy.example = to_device(example, "cpu")  # captures (sites, fold) use this input
    all_sites = [s.name for s in find_sites(model, strategy.example, kinds=kinds)]
    prepared = strategy.prepare(copy.deepcopy(model).cpu())
    all_units = strategy.units(prepared, kinds)

    # flat keys, as written since the first release: old run directories still resume
    cfg = {
        "method": strategy.name, "method_options": strategy.options(), **stop.to_dict(),
        "finetune": finetune.to_dict(), "pretrain": pretrain.to_dict() if pretrain else None,
        "seed": seed, "entropy_batches": entropy.batches, "fold_ready": entropy.fold_ready,
        "kinds": list(kinds), "sites": all_sites, "units": all_units, "unit": strategy.unit,
        "input_shape": list(example.shape[1:]) if isinstance(example, torch.Tensor) else None,
        "model_spec": getattr(model, "easier_spec", None), **dict(run.extra),
        **({} if entropy.linearize == "identity" else {"linearize": entropy.linearize}),
        # None when off, as in run directories written before it existed: those still resume
        "recovery": recovery.to_dict() if recovery.active else None,
    }
    rundir = RunDir(out, keep_iterations=run.keep_iterations) if out is not None else None
    saved = None
    if rundir is not None:
        # every rank checks (and reads) before rank 0 writes, so a refusal raises everywhere
        saved = rundir.start(cfg, resume=resume, mutable=_MUTABLE_KEYS, write=False)
        barrier()
        if info.is_main:
            rundir.start(cfg, resume=resume, mutable=_MUTABLE_KEYS)
        barrier()
    train_kw = {"device": device, "input_key": input_key, "progress": run.progress,
                "amp": run.amp, "regularizer": strategy.regularizer(),
                "after_step": strategy.after_step}
    delta = stop.delta

    base = copy.deepcopy(model).cpu()  # architecture to rebuild saved states into
    if saved is not None:
        history: list[dict[str, Any]] = saved["history"]
        baseline: dict[str, Any] = saved["baseline"]
        current = rebuild(saved["current"], copy.deepcopy(base)).to(device)
        accepted = (current if saved["accepted"] is None
                    else rebuild(saved["accepted"], copy.deepcopy(base)).to(device))
        stop_reason: str | None = saved["stop_reason"]
        stop_code: str | None = saved.get("stop_code")
        rejected = bool(saved.get("rejected", False))
        if stop_code == "limit" or (stop_code == "rejected" and stop.run_all):
            stop_reason = stop_code = None  # a larger budget, or --all, continues the run
        strategy.load_state_dict(saved.get("method_state") or {})
        teacher = load_teacher(rundir, base, device) if recovery.active and rundir else None
        say(f"resumed {out} after iteration {history[-1]['iteration']}")
        if saved.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            say(f"warning: saved with {saved['threads']} threads, resumed with "
                f"{torch.get_num_threads()}: float sums round differently, so the result can "
                f"differ from an uninterrupted run (--threads {saved['threads']} reproduces it)")
    else:
        if resume and rundir is not None:  # e.g. a relative --out from another directory
            say(f"--resume: {rundir.path.resolve()} holds no completed iteration; starting the "
                "run from the beginning")
        current = prepared.to(device)
        history, stop_reason, stop_code, rejected = [], None, None, False
        t0 = time.perf_counter()
        pre = None
        if pretrain is not None:
            seed_everything(seed)
            pre = fine_tune(current, train, pretrain, seed=seed, desc="pretrain", **train_kw)
            if pre.failed:
                raise NonFiniteError(f"pretraining failed: {pre.failed}; lower the learning rate")
        baseline = evaluate_all(current, val, test, device, input_key)
        record = {"iteration": 0, "chosen": [], "removed": [], "accepted": True,
                  "meets_threshold": True, "entropy": None, "scores": None, **baseline,
                  "train_loss": pre.loss if pre else None,
                  "train_acc": pre.accuracy if pre else None,
                  **cost_of(current, example), "seconds": {"total": time.perf_counter() - t0},
                  "failed": None}
        history.append(record)
        accepted = current
        teacher = teacher_of(current, rundir, write=info.is_main) if recovery.active else None
        say(status_line(record, baseline, delta))
        warning = near_chance(baseline["val_acc"], num_classes(current, example))
        if warning:  # now, not after minutes of removals that cannot mean anything
            say(warning)
        save_progress(rundir, history, baseline, current, accepted, (None, None), False, cfg,
                      strategy)

    hooks = recovery_hooks(recovery, teacher, val, delta=delta, batch_size=finetune.batch_size,
                           device=device, input_key=input_key)
    while stop_reason is None:
        k = history[-1]["iteration"] + 1
        removed = list(history[-1]["removed"])
        remaining = [u for u in strategy.units(current, kinds) if u not in removed]
        stop_reason, stop_code = limit_reason(stop, k, len(removed), remaining, strategy.unit)
        if stop_reason is not None:
            break
        want = min(stop.one_shot or 1, len(remaining))
        if stop.max_removals is not None:
            want = min(want, stop.max_removals - len(removed))
        t0 = time.perf_counter()
        ctx = Context(model=current, remaining=remaining, removed=removed, k=want, iteration=k,
                      rng=random.Random(seed * 1_000_003 + k), train_eval=train_eval, val=val,
                      device=device, kinds=kinds, fold_ready=entropy.fold_ready,
                      batch_size=finetune.batch_size, entropy_batches=entropy.batches,
                      input_key=input_key, progress=run.progress, example=example,
                      linearize_mode=entropy.linearize,
                      max_k=(None if stop.max_removals is None
                             else stop.max_removals - len(removed)))
        step = strategy.step(ctx)
        candidate = step.model.to(device)
        t_step = time.perf_counter() - t0
        seed_everything(seed + k)
        t1 = time.perf_counter()
        check = hooks.stop_check()
        ft = (fine_tune(candidate, train, finetune, seed=seed + 1000 * k, desc=f"iter {k}",
                        loss_fn=hooks.loss_fn, stop_check=check, **train_kw)
              if strategy.finetune else TrainResult())
        t_ft = time.perf_counter() - t1
        record = {"iteration": k, "chosen": step.chosen, "removed": removed + step.chosen,
                  "entropy": ctx.report.as_dict() if ctx.report is not None else None,
                  "scores": step.scores, "reason": step.reason, **step.info,
                  "train_loss": None if ft.steps == 0 else ft.loss,
                  "train_acc": None if ft.steps == 0 else ft.accuracy,
                  "finetune_epochs": ft.epochs, "finetune_steps": ft.steps, "failed": ft.failed,
                  "finetune_stopped_early": ft.stopped_early,
                  "early_stop_checks": None if check is None else [list(c) for c in check.checks]}
        if ft.failed:
            record.update(accepted=False, meets_threshold=False,
                          seconds={"step": t_step, "finetune": t_ft, "total": t_step + t_ft})
            history.append(record)
            stop_reason = (f"fine-tuning failed at iteration {k}: {ft.failed}; "
                           "kept the previous model")
            stop_code = "failed"
            say(f"iter {k:>2} | {', '.join(step.chosen)} | {stop_reason}")
            break
        t2 = time.perf_counter()
        scores = evaluate_all(candidate, val, test, device, input_key)
        ok = scores["val_acc"] >= baseline["val_acc"] - delta
        rest, t_more = (0 if ok else recovery.steps_left(ft)), 0.0
        if rest:  # the subset said "recovered", the full set did not: finish the budget first
            t3 = time.perf_counter()
            more = fine_tune(candidate, train, replace(finetune, max_steps=rest),
                             seed=seed + 1000 * k + 500, desc=f"iter {k} (rest)",
                             loss_fn=hooks.loss_fn, **train_kw)
            t_more = time.perf_counter() - t3
            record.update(finetune_steps=ft.steps + more.steps, finetune_continued=more.steps,
                          failed=more.failed, early_stop_val_acc=scores["val_acc"])
            if not more.failed:
                scores = evaluate_all(candidate, val, test, device, input_key)
                ok = scores["val_acc"] >= baseline["val_acc"] - delta
        record.update(scores, meets_threshold=ok, accepted=ok and not rejected,
                      **cost_of(candidate, example))
        record["seconds"] = {"step": t_step, "finetune": t_ft + t_more,
                             "eval": time.perf_counter() - t2 - t_more,
                             "total": time.perf_counter() - t0}
        history.append(record)
        current = candidate
        if record["accepted"]:
            accepted = candidate
        say(status_line(record, baseline, delta))
        if not ok and not rejected:
            rejected = True
            if not stop.run_all:
                stop_reason = (f"val top-1 {scores['val_acc']:.2f} < baseline "
                               f"{baseline['val_acc']:.2f} - delta {delta}")
                stop_code = "rejected"
        save_progress(rundir, history, baseline, current, accepted, (stop_code, stop_reason),
                      rejected, cfg, strategy)

    save_progress(rundir, history, baseline, current, accepted, (stop_code, stop_reason), rejected,
                  cfg, strategy)
    kept = next(h for h in reversed(history) if h["accepted"])["removed"]
    say(f"stopped: {stop_reason}; kept {len(kept)} removed {strategy.unit}(s)")
    result = ReduceResult(model=accepted, linearized=list(kept), history=history,
                          baseline=baseline, stop_reason=stop_reason or "",
                          out=rundir.path if rundir else None)
    if fold is not None and rundir is not None and info.is_main:
        from easier.io.artifacts import fold_run

        result.extras["fold"] = fold_run(rundir.path, plan=fold, model=copy.deepcopy(base))
        mode = fold if isinstance(fold, str) else fold.plan
        say(f"folded (plan={mode}), max |error| "
            f"{result.extras['fold']['plan']['max_abs_error']:.2g}:\n"
            f"{result.extras['fold']['table']}")
    barrier()
    return result


