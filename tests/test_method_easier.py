"""EASIER's ``also_zero``: every other zero-entropy site goes in the same iteration."""

import random

import torch
from torch import nn
from torch.utils.data import TensorDataset

from easier.methods import Context
from easier.methods.easier import Easier


class Four(nn.Module):
    """Four parallel Linear-ReLU sites, summed; b always ON (bias +50), d always OFF (-50)."""

    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.fc, self.fd = (nn.Linear(4, 4) for _ in range(4))
        self.a, self.b, self.c, self.d = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        with torch.no_grad():
            self.fb.bias.fill_(50.0)
            self.fd.bias.fill_(-50.0)

    def pre(self, x):
        """Each site's pre-activation, in order."""
        return {"a": self.fa(x), "b": self.fb(x), "c": self.fc(x), "d": self.fd(x)}

    def forward(self, x):
        pre = self.pre(x)
        return self.a(pre["a"]) + self.b(pre["b"]) + self.c(pre["c"]) + self.d(pre["d"])


def zero_entropy_by_hand(model, x):
    """Sites where every neuron is always ON or always OFF (exact zeros left out)."""
    with torch.no_grad():
        pre = model.pre(x)
    out = []
    for name, z in pre.items():
        on, off = (z > 0).sum(0), (z < 0).sum(0)
        if bool(((on == 0) | (off == 0)).all()):
            out.append(name)
    return out


def ctx(model, data):
    return Context(model=model, remaining=["a", "b", "c", "d"], removed=[], k=1, iteration=1,
                   rng=random.Random(0), train_eval=data, batch_size=16)


def test_also_zero_takes_exactly_the_zero_entropy_sites():
    torch.manual_seed(0)
    model = Four().eval()
    x = torch.randn(64, 4)
    data = TensorDataset(x, torch.zeros(64, dtype=torch.long))
    zeros = zero_entropy_by_hand(model, x)
    assert zeros == ["b", "d"]  # the model is built so; a and c are mixed
    step = Easier(also_zero=True).step(ctx(model, data))
    assert step.chosen == zeros  # the lowest (earliest tie) first, then the other zero
    assert {s for s, h in step.scores.items() if h == 0.0} == set(zeros)
    assert Easier().step(ctx(model, data)).chosen == ["b"]  # without: one site per iteration
