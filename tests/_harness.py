"""A tiny reduce run shared by the method tests (resume and stopping checks)."""

import json

import torch
from torch.utils.data import TensorDataset

from easier.loop import reduce
from easier.models import create
from easier.train import FineTune


def tiny_run(out, method, resume=False, max_removals=2):
    """convnet (width 0.25) on 80 synthetic 8x8 images; deterministic for a given method."""
    torch.manual_seed(0)
    model = create("convnet", width=0.25, image_size=8, num_classes=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    train, val = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    return reduce(model, train, val, method=method, delta=100.0, max_removals=max_removals,
                  out=out, resume=resume, finetune=FineTune(epochs=1, lr=0.05, batch_size=16),
                  pretrain=FineTune(epochs=2, lr=0.05, batch_size=16), seed=1)


def history_rows(run_dir):
    """history.jsonl of a run without wall times, for comparing runs."""
    out = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    for r in out:
        r.pop("seconds")
    return out
