"""The reduction loop (paper Fig. 1), shared by every method.

    (train) -> evaluate -> [ method chooses -> edit -> fine-tune -> evaluate -> accept or stop ]

:func:`reduce` reads as four steps over a :class:`~easier.pipeline.state.RunState`: *open* the
run (check the data, create the method, write or check config.json), *start* it (pretrain,
score the dense model) or *resume* it from its run directory, *iterate* until it stops, and
*finish* (fold the kept model). The loop stops when validation top-1 falls below
``baseline - delta`` (percentage points), at a budget, or when no unit is left; the returned
model is the last one that met the threshold. The state is written atomically after every
iteration, so a killed run resumes from its last completed iteration and reaches the same
result.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from easier.data.checks import check_datasets
from easier.errors import ConfigError, NonFiniteError
from easier.graph.capture import to_device
from easier.graph.sites import find_sites
from easier.io.artifacts import FoldOptions, fold_run
from easier.io.rundir import RunDir, check_resume_environment, lock_run_dir_ranks
from easier.methods import Method, create_method
from easier.parallel import barrier, get_info
from easier.pipeline.confidence import delta_warning
from easier.pipeline.iteration import Run, iterate
from easier.pipeline.scores import cost_of, example_batch, num_classes, val_size
from easier.pipeline.settings import EditConfig, EntropyConfig, RunConfig, Settings, StopRule
from easier.pipeline.state import RunState
from easier.report.files import history_table
from easier.report.outcome import near_chance, write_outcome
from easier.report.progress import status_line, talker
from easier.train.correct import per_sample_correct
from easier.train.finetune import FineTune, fine_tune, seed_everything
from easier.train.recovery import (
    Recovery,
    load_teacher,
    recovery_hooks,
    teacher_of,
)

__all__ = ["ReduceResult", "reduce"]

# Settings a resumed run may change: a run stopped by a budget continues when the budget grows.
_MUTABLE_KEYS = ("stop.max_removals", "stop.max_iterations", "stop.run_all", "model_file")


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
    edit: EditConfig | None = None,
    run: RunConfig | None = None,
    finetune: FineTune | None = None,
    pretrain: FineTune | None = None,
    fold: str | FoldOptions | None = None,
    recovery: Recovery | None = None,
) -> ReduceResult:
    """Run a depth-reduction method end to end and return the reduced model.

    ``train`` is the (augmented) training data for fine-tuning; ``train_eval`` the same images
    without augmentation for the entropy pass (defaults to ``train``); ``test`` is only
    reported. The settings are small config objects: ``stop`` (:class:`StopRule`) says when to
    stop, ``entropy`` (:class:`EntropyConfig`) which sites are candidates and how much data
    measures them, ``edit`` (:class:`EditConfig`) what a removed site computes, ``run``
    (:class:`RunConfig`) seed, device, dict-batch key and logging; ``finetune`` is the budget
    after each removal, ``pretrain`` trains the dense model first (skip it for a trained model),
    ``recovery`` (:class:`Recovery`) adds early stop and distillation to each fine-tune.
    ``out`` is a run directory, held under an OS lock for the whole call; ``resume=True``
    continues a killed run (a finished one is left as it is). ``fold`` (a plan: "latency",
    "flops", "all", "none", or :class:`~easier.io.artifacts.FoldOptions`) folds the kept model
    at the end and writes folded.pt2, fold_plan.json and fold.md to ``out``.
    """
    settings = _settings(stop, entropy, edit, run, finetune, pretrain, recovery)
    if fold is not None and out is None:
        raise ConfigError("fold= needs out= (the folded model and plan are written there)")
    data = {"train": train, "val": val, "test": test,
            "train_eval": train if train_eval is None else train_eval}
    with _writer_lock(out, get_info()):
        r, saved = _open(model, data, method, settings, out, resume)
        state = _resume(r, saved) if saved is not None else _start(r)
        finished_before = state.done
        r.hooks = recovery_hooks(settings.recovery, state.teacher, val,
                                 delta=settings.stop.delta,
                                 batch_size=settings.finetune.batch_size, device=r.device,
                                 input_key=settings.run.input_key)
        while not state.done:
            iterate(r, state)
        return _finish(r, state, fold, finished_before)


def _settings(stop: Any, entropy: Any, edit: Any, run: Any, finetune: Any, pretrain: Any,
              recovery: Any) -> Settings:
    """The call's settings, each checked to be the config object it should be."""
    given = {"stop": (stop, StopRule), "entropy": (entropy, EntropyConfig),
             "edit": (edit, EditConfig), "run": (run, RunConfig),
             "finetune": (finetune, FineTune), "pretrain": (pretrain, FineTune),
             "recovery": (recovery, Recovery)}
    for name, (value, cls) in given.items():
        if value is not None and not isinstance(value, cls):
            raise ConfigError(f"reduce({name}=...) takes a {cls.__name__}, got "
                              f"{type(value).__name__}: e.g. {name}={cls.__name__}(...)")
    return Settings(stop or StopRule(), entropy or EntropyConfig(), edit or EditConfig(),
                    run or RunConfig(), finetune or FineTune(), pretrain,
                    recovery or Recovery())


@contextlib.contextmanager
def _writer_lock(out: str | Path | None, info: Any) -> Iterator[None]:
    """The run directory's writer lock for every rank (re-entrant: the CLI may hold it)."""
    if out is None:
        yield
        return
    with lock_run_dir_ranks(out, info):
        yield


def _open(model: nn.Module, data: dict[str, Any], method: str | Method, settings: Settings,
          out: str | Path | None, resume: bool) -> tuple[Run, dict[str, Any] | None]:
    """Check the data, create the method, write (or check against) config.json."""
    run, info = settings.run, get_info()
    check_datasets(data["train"], data["val"], test=data["test"],
                   train_eval=data["train_eval"], model=model, input_key=run.input_key)
    strategy = create_method(method)
    device = torch.device(run.device)
    example = to_device(example_batch(data["val"], run.input_key), device)
    strategy.example = to_device(example, "cpu")  # captures (sites, fold) use this input
    kinds = settings.entropy.kinds
    prepared = strategy.prepare(copy.deepcopy(model).cpu())
    facts = {
        "sites": [s.name for s in find_sites(prepared, strategy.example, kinds=kinds)],
        "units": strategy.units(prepared, kinds), "unit": strategy.unit,
        "input_shape": list(example.shape[1:]) if isinstance(example, torch.Tensor) else None,
        "model_spec": getattr(model, "easier_spec", None),
    }
    cfg = settings.to_config(strategy, facts)
    rundir = RunDir(out, keep_iterations=run.keep_iterations) if out is not None else None
    saved = None
    if rundir is not None:
        # every rank checks (and reads) before rank 0 writes, so a refusal raises everywhere
        saved = rundir.start(cfg, resume=resume, mutable=_MUTABLE_KEYS, write=False)
        barrier()
        if info.is_main:
            rundir.start(cfg, resume=resume, mutable=_MUTABLE_KEYS)
            if facts["input_shape"] is None:  # what a later fold captures on
                rundir.write_example(strategy.example)
        barrier()
    say = talker(run.verbose, run.log, info.is_main)  # only rank 0 talks and writes
    if saved is None and resume and rundir is not None:  # e.g. a relative --out elsewhere
        say(f"--resume: {rundir.path.resolve()} holds no completed iteration; starting the "
            "run from the beginning")
    r = Run(strategy, settings, data, device, example, copy.deepcopy(model).cpu(), prepared,
             cfg, rundir, say)
    return r, saved


def _start(r: Run) -> RunState:
    """Pretrain if asked, score the dense model: iteration 0."""
    s, t0 = r.settings, time.perf_counter()
    current = r.prepared.to(r.device)
    pre = None
    if s.pretrain is not None:
        seed_everything(s.run.seed)
        pre = fine_tune(current, r.data["train"], s.pretrain, seed=s.run.seed, desc="pretrain",
                        **r.train_kw())
        if pre.failed:
            raise NonFiniteError(f"pretraining failed: {pre.failed}; lower the learning rate")
    baseline = r.scores(current)
    row = {"iteration": 0, "chosen": [], "removed": [], "accepted": True,
           "meets_threshold": True, "entropy": None, "scores": None, **baseline,
           "train_loss": pre.loss if pre else None, "train_acc": pre.accuracy if pre else None,
           **cost_of(current, r.example), "seconds": {"total": time.perf_counter() - t0},
           "failed": None}
    state = RunState([row], baseline, current, current)
    if s.stop.confidence is not None:  # kept in state.pt: a resumed run compares to the same
        state.baseline_correct = per_sample_correct(current, r.data["val"], r.device,
                                                    s.run.input_key)
    if s.recovery.active:
        state.teacher = teacher_of(current, r.rundir, write=get_info().is_main)
    r.say(status_line(row, baseline, s.stop.delta))
    warning = near_chance(baseline["val_acc"], num_classes(current, r.example))
    if warning:  # now, not after minutes of removals that cannot mean anything
        r.say(warning)
    n = val_size(r.data["val"])
    noisy = None if n is None else delta_warning(s.stop.delta, baseline["val_acc"], n)
    if noisy:
        r.say(f"warning: {noisy}")
    state.save(r.rundir, r.cfg, r.strategy)
    return state


def _resume(r: Run, saved: dict[str, Any]) -> RunState:
    """The saved state; a larger budget (or ``run_all``) reopens a run a budget stopped."""
    s = r.settings
    state = RunState.from_saved(saved, r.base, r.device)
    if state.stop_code == "limit" or (state.stop_code == "rejected" and s.stop.run_all):
        state.stop(None, None)
    r.strategy.load_state_dict(saved.get("method_state") or {})
    if s.recovery.active and r.rundir is not None:
        state.teacher = load_teacher(r.rundir, r.base, r.device)
    r.say(f"resumed {r.rundir.path if r.rundir else ''} after iteration "
          f"{state.history[-1]['iteration']}")
    for line in check_resume_environment(saved, get_info()):
        r.say(line)
    return state


def _finish(r: Run, state: RunState, fold: str | FoldOptions | None,
            finished_before: bool) -> ReduceResult:
    """Save the final state and fold the kept model. A run that was finished before this
    call is left untouched (folding it again is ``easier.io.artifacts.fold_run``)."""
    info = get_info()
    if finished_before:
        r.say(f"the run in {r.rundir.path if r.rundir else ''} was already finished "
              f"({state.stop_reason}); nothing changed")
    else:
        state.save(r.rundir, r.cfg, r.strategy)
        r.say(f"stopped: {state.stop_reason}; kept {len(state.kept)} removed "
              f"{r.strategy.unit}(s)")
    result = ReduceResult(model=state.accepted, linearized=state.kept, history=state.history,
                          baseline=state.baseline, stop_reason=state.stop_reason or "",
                          out=r.rundir.path if r.rundir else None)
    folded_before = r.rundir is not None and r.rundir.file("fold_plan.json").exists()
    if (fold is not None and r.rundir is not None and info.is_main
            and not (finished_before and folded_before)):
        on_cpu = r.device.type == "cpu"  # then the kept model in memory is model.pt's content
        result.extras["fold"] = fold_run(r.rundir.path, plan=fold, model=copy.deepcopy(r.base),
                                         kept=state.accepted if on_cpu else None)
        mode = fold if isinstance(fold, str) else fold.plan
        r.say(f"folded (plan={mode}), max |error| "
              f"{result.extras['fold']['plan']['max_abs_error']:.2g}:\n"
              f"{result.extras['fold']['table']}")
    if r.rundir is not None and info.is_main:  # report.md: what the run gave back
        result.extras["outcome"] = write_outcome(result, r.rundir.file("report.md"),
                                                 r.strategy.unit)
    barrier()
    return result
