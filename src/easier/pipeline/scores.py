"""What the loop measures of a model at each iteration: val/test accuracy, cost, the stop
limits, and an example batch for the captures (no timing, so every iteration can afford it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from easier.entropy.estimate import batch_input
from easier.graph.capture import call_model, eval_mode, logits_of
from easier.pipeline.settings import StopRule
from easier.report.outcome import nonzero_params
from easier.train.finetune import evaluate, make_loader

__all__ = ["cost_of", "evaluate_all", "example_batch", "limit_reason", "num_classes", "val_size"]


def example_batch(data: Dataset | DataLoader, input_key: Any) -> Any:
    batch = next(iter(make_loader(data, 2, shuffle=False)))  # 2: a batch of 1 pins the batch size
    return batch_input(batch, input_key)


def cost_of(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Params (and those not exactly zero), FLOPs per sample, depth and remaining activations
    (no timing: cheap)."""
    from easier.perf.measure import measure

    m = measure(model, example, latency=False)
    # "flops" is at the example's batch (kept: older runs and ratios read it); per sample too
    return {"params": m.params, "flops": m.flops, "flops_per_sample": m.flops_per_sample,
            "depth": m.depth, "activations": m.activations,
            "nonzero_params": nonzero_params(model)}


def limit_reason(stop: StopRule, k: int, n_removed: int, remaining: list[str],
           unit: str) -> tuple[str | None, str | None]:
    """(reason, code) when iteration ``k`` must not run, else (None, None)."""
    if not remaining:
        return f"no {unit} left", "exhausted"
    if stop.max_removals is not None and n_removed >= stop.max_removals:
        return f"max_removals={stop.max_removals} reached", "limit"
    if stop.one_shot is not None and k > 1:
        return f"one-shot of {stop.one_shot} done", "one-shot"
    if stop.max_iterations is not None and k > stop.max_iterations:
        return f"max_iterations={stop.max_iterations} reached", "limit"
    return None, None


@torch.no_grad()
def num_classes(model: nn.Module, example: Any) -> int:
    """Width of the model's logits on one example batch (1 when it is not a classifier)."""
    with eval_mode(model):
        out = logits_of(call_model(model, example))
    return int(out.shape[-1]) if out.ndim >= 2 else 1


def val_size(data: Any) -> int | None:
    """Samples in a val set (a Dataset or a DataLoader over one), None when it has no length."""
    data = getattr(data, "dataset", data)
    try:
        return len(data)
    except TypeError:
        return None


def evaluate_all(model: nn.Module, val: Any, test: Any, device: torch.device,
                  input_key: str | None) -> dict[str, Any]:
    val_loss, val_acc = evaluate(model, val, device=device, input_key=input_key)
    out: dict[str, Any] = {"val_loss": val_loss, "val_acc": val_acc,
                           "test_loss": None, "test_acc": None}
    if test is not None:
        out["test_loss"], out["test_acc"] = evaluate(model, test, device=device,
                                                     input_key=input_key)
    return out
