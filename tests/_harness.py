"""A tiny reduce run shared by the method tests (resume and stopping checks)."""

import json

import torch
from torch import nn
from torch.utils.data import TensorDataset

from easier import RunConfig, StopRule
from easier.models import create
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune


def tiny_run(out, method, resume=False, max_removals=2):
    """convnet (width 0.25) on 80 synthetic 8x8 images; deterministic for a given method."""
    torch.manual_seed(0)
    model = create("convnet", width=0.25, image_size=8, num_classes=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    train, val = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    return reduce(model, train, val, method=method, out=out, resume=resume,
                  finetune=FineTune(epochs=1, lr=0.05, batch_size=16),
                  pretrain=FineTune(epochs=2, lr=0.05, batch_size=16),
                  stop=StopRule(delta=100.0, max_removals=max_removals), run=RunConfig(seed=1))


def crash_at(method_cls, at, **options):
    """An instance of ``method_cls`` that dies at the start of iteration ``at``, like a kill."""

    class Crash(method_cls):
        def step(self, ctx):
            if ctx.iteration == at:
                raise KeyboardInterrupt
            return super().step(ctx)

    return Crash(**options)


def history_rows(run_dir):
    """history.jsonl of a run without wall times, for comparing runs."""
    out = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    for r in out:
        r.pop("seconds")
    return out


def rand_bn(c, cls=nn.BatchNorm2d):
    """A BatchNorm with non-trivial running statistics and affine parameters (eval folds)."""
    bn = cls(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


class InvertedResidual(nn.Module):
    """MobileNetV2 block (stride 1, C_in == C_out) with both ReLU6 already removed."""

    def __init__(self, c=4, expand=6):
        super().__init__()
        h = c * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), rand_bn(h), nn.Identity(),
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), rand_bn(h), nn.Identity(),
            nn.Conv2d(h, c, 1, bias=False), rand_bn(c),
        )

    def forward(self, x):
        return x + self.conv(x)
