"""Training and fine-tuning: a plain PyTorch loop, short enough to read in one sitting."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from easier.entropy.estimate import batch_input
from easier.errors import ConfigError, NonFiniteError, check_fields
from easier.graph.capture import call_model, logits_of, to_device
from easier.parallel.collectives import all_finite, reduce_accuracy
from easier.parallel.loaders import make_loader, shard_loader, targets
from easier.parallel.passes import evaluate_distributed, wrap_ddp
from easier.parallel.runtime import get_info
from easier.train.objective import cross_entropy, hits

# make_loader and targets live with the sharded loaders (easier.parallel.loaders); they are
# part of this module's API too.
__all__ = ["FineTune", "TrainResult", "evaluate", "fine_tune", "make_loader", "seed_everything",
           "targets"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")


@dataclass(frozen=True)
class FineTune:
    """One training schedule. Each EASIER iteration runs it from scratch (fresh optimizer).

    ``milestones`` are epochs for ``schedule="multistep"``; ``max_steps`` caps the number of
    optimizer steps per call (handy for smoke runs).
    """

    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    batch_size: int = 128
    max_steps: int | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}; valid: {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; valid: {list(SCHEDULES)}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(
                f"need epochs >= 0, batch_size >= 1 and lr > 0; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}"
            )
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FineTune:
        check_fields(cls, d)
        return cls(**d)


@dataclass
class TrainResult:
    """What a call of :func:`fine_tune` did. ``failed`` holds the reason when it failed;
    ``stopped_early`` is True when ``stop_check`` ended it before the budget; ``budget`` is the
    number of optimizer steps the full budget would have taken (epochs x batches, capped by
    ``max_steps``)."""

    epochs: int = 0
    steps: int = 0
    budget: int = 0
    seconds: float = 0.0
    loss: float = math.nan
    accuracy: float = math.nan
    failed: str | None = None
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and Python's hash-free RNGs used by easier."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model: nn.Module, cfg: FineTune) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: FineTune, steps_per_epoch: int):
    """Per-step schedule, so a short fine-tune still decays its learning rate."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total = max(1, min(total, cfg.max_steps))
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if cfg.schedule == "multistep":
        marks = [m * steps_per_epoch for m in cfg.milestones]
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cfg.gamma ** sum(s >= m for m in marks))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def fine_tune(
    model: nn.Module,
    data: Dataset | DataLoader,
    cfg: FineTune,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    input_key: str | None = None,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    amp: bool = False,
    progress: bool = False,
    desc: str = "train",
    loss_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None,
    stop_check: Callable[[nn.Module, int], bool] | None = None,
) -> TrainResult:
    """Train ``model`` in place with a fresh optimizer and schedule; stop at the first NaN loss.

    The data order of epoch ``e`` is fixed by ``seed + e``, so a resumed run repeats it exactly.
    ``regularizer(model)`` (if given) is added to the cross-entropy loss of every step; if it
    has an ``attach(model)`` method (e.g. to hook block features), that is called first and the
    handle it returns is removed at the end. ``after_step(model)`` runs after every optimizer
    step (e.g. to re-apply pruning masks). Under ``torchrun`` (an initialised process group) the
    model is wrapped in DistributedDataParallel and each rank trains on its DistributedSampler
    shard; the reported loss and accuracy are summed over ranks. ``amp=True`` trains under
    bfloat16 autocast (no loss scaling needed); on CUDA, 4-D inputs and the model use
    channels_last, which suits tensor cores. ``loss_fn(logits, y, x)`` replaces the
    cross-entropy (e.g. distillation, :mod:`easier.recovery`); ``stop_check(model, steps)``
    runs after every optimizer step and ends training early when it returns True.
    """
    res = TrainResult()
    if cfg.epochs == 0 or cfg.max_steps == 0:
        return res
    t0 = time.perf_counter()
    model.to(device).train()
    handle = regularizer.attach(model) if hasattr(regularizer, "attach") else None
    try:
        return _fit(model, data, cfg, res, t0, seed=seed, device=device, input_key=input_key,
                    regularizer=regularizer, after_step=after_step, progress=progress, desc=desc,
                    amp=amp, loss_fn=loss_fn, stop_check=stop_check)
    finally:
        if handle is not None:
            handle.remove()


def _fit(model: nn.Module, data: Dataset | DataLoader, cfg: FineTune, res: TrainResult, t0: float,
         *, seed: int, device: torch.device | str, input_key: str | None,
         regularizer: Callable[[nn.Module], torch.Tensor] | None,
         after_step: Callable[[nn.Module], None] | None, progress: bool,
         desc: str, amp: bool = False, loss_fn: Any = None, stop_check: Any = None
         ) -> TrainResult:
    info = get_info()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    net = wrap_ddp(model, info) if info.enabled else model

    def loader_for(epoch: int) -> Any:
        if info.enabled:
            return shard_loader(data, cfg.batch_size, shuffle=True, seed=seed, epoch=epoch,
                                info=info)
        return make_loader(data, cfg.batch_size, shuffle=True, seed=seed + epoch)

    try:
        return _epochs(net, model, loader_for, cfg, res, t0, info=info, device=device,
                       input_key=input_key, regularizer=regularizer, after_step=after_step,
                       progress=progress, desc=desc, reduce_accuracy=reduce_accuracy,
                       amp=amp, channels_last=cuda, loss_fn=loss_fn, stop_check=stop_check)
    finally:
        del net  # a DDP wrapper alive at process exit can abort gloo


def _epochs(net: nn.Module, model: nn.Module, loader_for: Callable[[int], Any], cfg: FineTune,
            res: TrainResult, t0: float, *, info: Any, device: torch.device | str,
            input_key: str | None, regularizer: Callable[[nn.Module], torch.Tensor] | None,
            after_step: Callable[[nn.Module], None] | None, progress: bool, desc: str,
            reduce_accuracy: Callable[..., tuple[float, float]], amp: bool = False,
            channels_last: bool = False, loss_fn: Any = None,
            stop_check: Any = None) -> TrainResult:
    dev_type = torch.device(device).type
    opt = _optimizer(model, cfg)
    first = loader_for(0)
    sched = _scheduler(opt, cfg, max(1, len(first)))
    res.budget = len(first) * cfg.epochs
    if cfg.max_steps is not None:
        res.budget = min(res.budget, cfg.max_steps)
    for epoch in range(cfg.epochs):
        loader = first if epoch == 0 else loader_for(epoch)
        if progress:
            from easier.report.progress import progress as show_progress

            loader = show_progress(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}")
        total_loss, correct, seen = 0.0, 0, 0
        for batch in loader:
            x = to_device(batch_input(batch, input_key), device)
            y = targets(batch).to(device, non_blocking=True)
            if channels_last and isinstance(x, torch.Tensor) and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
                logits = logits_of(call_model(net, x))
                loss = (cross_entropy(logits.float(), y, x) if loss_fn is None
                        else loss_fn(logits.float(), y, x))
            if regularizer is not None:
                loss = loss + regularizer(model)
            if not all_finite(loss, info):
                here = float(loss.detach())
                res.failed = (f"non-finite loss ({here} on this rank; all ranks stop) at epoch "
                              f"{epoch + 1}, step {res.steps}" if info.enabled else
                              f"non-finite loss ({here}) at epoch {epoch + 1}, step {res.steps}")
                res.seconds = time.perf_counter() - t0
                return res
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if after_step is not None:
                after_step(model)
            sched.step()
            res.steps += 1
            hit, counted = hits(logits.detach(), y, x)
            total_loss += float(loss.detach()) * counted
            correct += hit
            seen += counted
            if cfg.max_steps is not None and res.steps >= cfg.max_steps:
                break
            if stop_check is not None and stop_check(model, res.steps):
                res.stopped_early = True
                break
        res.epochs = epoch + 1
        if info.enabled:
            res.loss, res.accuracy = reduce_accuracy(total_loss, correct, seen, info)
        else:
            res.loss, res.accuracy = total_loss / max(seen, 1), 100.0 * correct / max(seen, 1)
        res.history.append({"epoch": epoch + 1, "loss": res.loss, "accuracy": res.accuracy})
        if res.stopped_early or (cfg.max_steps is not None and res.steps >= cfg.max_steps):
            break
    res.seconds = time.perf_counter() - t0
    return res


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256,
             device: torch.device | str = "cpu",
             input_key: str | None = None) -> tuple[float, float]:
    """(mean cross-entropy loss, top-1 accuracy in %) in eval mode; restores the model's mode.

    Under ``torchrun`` each rank evaluates an exact shard of a Dataset and the sums are reduced.
    """
    info = get_info()
    if info.enabled and not isinstance(data, DataLoader):
        return evaluate_distributed(model, data, info, batch_size=batch_size, device=device,
                                    input_key=input_key)
    was = model.training
    model.to(device).eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for batch in make_loader(data, batch_size, shuffle=False):
            x = to_device(batch_input(batch, input_key), device)
            y = targets(batch).to(device)
            logits = logits_of(call_model(model, x))
            total_loss += float(cross_entropy(logits, y, x, reduction="sum"))
            hit, counted = hits(logits, y, x)
            correct += hit
            seen += counted
    finally:
        model.train(was)
    if seen == 0:
        raise ConfigError("evaluate() got an empty dataset")
    if not math.isfinite(total_loss):
        raise NonFiniteError("evaluation loss is not finite: the model produces NaN/Inf logits")
    return total_loss / seen, 100.0 * correct / seen
