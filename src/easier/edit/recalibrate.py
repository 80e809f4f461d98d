"""Re-estimate batch-norm running statistics after an edit, before anything is scored.

Linearizing a site changes the distribution every later BN layer sees, but its running mean and
variance still describe the old network. A model scored right after an edit (before any
fine-tuning) is then dominated by stale statistics: on a small CNN here one removed ReLU cost
61-87 points with stale statistics and 10-17 with re-estimated ones. A few forward passes in
no-grad mode with only the BN layers in train mode fix that without touching any weight.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from easier.entropy.estimate import batch_input, model_device
from easier.graph.capture import call_model, to_device
from easier.parallel.loaders import make_loader

__all__ = ["reestimate_bn"]


@torch.no_grad()
def reestimate_bn(model: nn.Module, data: Dataset | DataLoader, *, batches: int = 8,
                  batch_size: int = 128, input_key: str | None = None) -> int:
    """Reset and re-estimate every BN layer's running statistics on ``batches`` batches.

    Statistics are the cumulative average over the batches (``momentum=None``), not an
    exponential one, so the result does not depend on the order of the batches. Only BN layers
    run in train mode (dropout stays off); weights are untouched; modes and momenta are
    restored. Returns the number of BN layers re-estimated (0: the model is unchanged).
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    device = model_device(model)
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        loader = data if isinstance(data, DataLoader) else make_loader(data, batch_size,
                                                                         shuffle=False)
        for batch in itertools.islice(loader, batches):
            call_model(model, to_device(batch_input(batch, input_key), device))
    finally:
        for m, was in modes.items():
            m.train(was)
        for m, mom in momenta.items():
            m.momentum = mom
    return len(norms)
