"""Which val samples a model gets right: the input of a paired comparison of two models.

:func:`easier.train.finetune.evaluate` returns only the accuracy; a paired test of two models
(:func:`easier.pipeline.confidence.paired_bootstrap`) needs the per-sample outcome, in the same
order for both, which the unshuffled loader guarantees.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from easier.entropy.estimate import batch_input
from easier.errors import ConfigError
from easier.graph.capture import call_model, logits_of, to_device
from easier.parallel.loaders import make_loader, targets
from easier.train.objective import align

__all__ = ["correct_of", "per_sample_correct"]


def correct_of(logits: torch.Tensor, y: torch.Tensor, x: object = None) -> torch.Tensor:
    """Per-sample top-1 correctness of one batch of class targets, as a bool ``(N,)``.

    Per-token targets (language models, token classification) are refused: the tokens of one
    sequence are not independent samples, so resampling them one by one would understate the
    spread of the accuracy; a per-sequence comparison is not implemented.
    """
    lg, t = align(logits, y, x)
    if t.ndim != 1 or lg.ndim != 2 or t.is_floating_point() or lg.shape[0] != y.shape[0]:
        raise ConfigError(
            f"per-sample correctness needs one class index per sample (targets of shape (N,)); "
            f"got targets of shape {tuple(y.shape)} for logits of shape {tuple(logits.shape)}. "
            "Per-token (language-model) labels are not supported by the paired bootstrap: "
            "compare models by their token accuracy instead")
    return lg.argmax(-1) == t


@torch.no_grad()
def per_sample_correct(model: nn.Module, data: Dataset | DataLoader,
                       device: torch.device | str = "cpu", input_key: str | None = None, *,
                       batch_size: int = 256) -> torch.Tensor:
    """Whether ``model`` (eval mode) gets each sample of ``data`` right, in data order (CPU bool).

    Single process (not sharded under torchrun). The model's mode is restored.
    """
    was = model.training
    model.to(device).eval()
    out = []
    try:
        for batch in make_loader(data, batch_size, shuffle=False):
            x = to_device(batch_input(batch, input_key), device)
            y = targets(batch).to(device)
            out.append(correct_of(logits_of(call_model(model, x)), y, x).cpu())
    finally:
        model.train(was)
    if not out:
        raise ConfigError("per_sample_correct() got an empty dataset")
    return torch.cat(out)
