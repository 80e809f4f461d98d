"""Entropy measured during training (the reference's timing), against brute-force counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import easier
from easier.entropy.train_counts import TrainCounts
from easier.errors import ConfigError
from easier.methods.easier import Easier
from easier.train.finetune import FineTune, fine_tune


def _h(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h)


def _layer_entropy(z: np.ndarray) -> float:
    """Mean over columns of the binary entropy of P(z > 0) among the nonzero entries."""
    on, off = (z > 0).sum(0), (z < 0).sum(0)
    p = np.where(on + off > 0, on / np.maximum(on + off, 1), 0.0)
    return float(_h(p).mean())


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(8, 6)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.bn(self.fc1(x))))))


def _train_mode_report(m: nn.Module, xs: list[torch.Tensor], **options):
    """Counts over ``xs`` as fine_tune takes them: hooks attached, train mode, one step each."""
    counts = TrainCounts(xs[0][:2], **options)
    handle = counts.attach(m)
    m.train()
    with torch.no_grad():
        for x in xs:
            m(x)
            counts(m)
    handle.remove()
    return counts.report()


def test_counts_use_batch_statistics_in_train_mode():
    torch.manual_seed(0)
    m = BNNet()
    xs = [torch.randn(16, 5) + 3.0 for _ in range(3)]  # shifted: stale running stats differ
    rep = _train_mode_report(m, xs)
    # brute force, batch by batch, with each batch's own mean and biased variance
    z1s, z2s = [], []
    with torch.no_grad():
        for x in xs:
            a = m.fc1(x).double()
            z1 = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + m.bn.eps)
            z1 = z1 * m.bn.weight.double() + m.bn.bias.double()
            z1s.append(z1.numpy())
            z2s.append(m.fc2(torch.relu(z1).float()).double().numpy())
    assert rep["act1"] == pytest.approx(_layer_entropy(np.concatenate(z1s)), abs=1e-12)
    assert rep["act2"] == pytest.approx(_layer_entropy(np.concatenate(z2s)), abs=1e-12)
    assert rep.batches == 3
    # the eval-mode pass sees running statistics instead, and a different entropy
    ev = easier.measure_entropy(m, [x for x in xs])
    assert abs(ev["act1"] - rep["act1"]) > 0.05


def test_window_keeps_only_the_last_batches():
    torch.manual_seed(1)
    m = BNNet().train()
    xs = [torch.randn(8, 5) * (i + 1) for i in range(4)]
    rep = _train_mode_report(m, xs, window=2)
    assert rep.batches == 2
    with torch.no_grad():
        z = []
        for x in xs[2:]:
            a = m.fc1(x)
            z.append(F.batch_norm(a, None, None, m.bn.weight, m.bn.bias, training=True,
                                  eps=m.bn.eps).numpy())
    assert rep["act1"] == pytest.approx(_layer_entropy(np.concatenate(z)), abs=1e-6)
    assert int(rep.neurons("act1").on.sum() + rep.neurons("act1").off.sum()) <= 2 * 8 * 8


def test_attached_by_fine_tune_counts_every_step_and_unhooks():
    torch.manual_seed(2)
    m = BNNet()
    data = TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    counts = TrainCounts(torch.randn(2, 5))
    fine_tune(m, data, FineTune(epochs=1, batch_size=10, lr=0.01), regularizer=counts)
    assert counts.batches == 4
    rep = counts.report()
    assert set(rep.names) == {"act1", "act2"}
    assert all(0.0 <= h <= 1.0 for _, h in rep.items())
    before = counts.batches
    with torch.no_grad():
        m.train()(torch.randn(4, 5))  # hooks removed: nothing more is counted
    counts(m)
    assert counts.batches == before


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


def test_functional_sites_are_refused_with_advice():
    counts = TrainCounts(torch.randn(2, 4))
    with pytest.raises(ConfigError, match="entropy_during='eval'"):
        counts.attach(Functional())


def test_bad_options():
    with pytest.raises(ConfigError, match="entropy_during"):
        Easier(entropy_during="later")
    with pytest.raises(ConfigError, match="window"):
        TrainCounts(torch.randn(2, 4), window=0)


@pytest.mark.slow
def test_reduce_chooses_the_lowest_train_mode_entropy():
    torch.manual_seed(3)
    x = torch.randn(96, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    method = Easier(entropy_during="train-epoch")
    res = easier.reduce(BNNet(), data, data, method=method,
                        stop=easier.StopRule(max_removals=1),
                        pretrain=FineTune(epochs=1, batch_size=32, lr=0.05),
                        finetune=FineTune(epochs=1, batch_size=32, lr=0.01))
    first = res.history[1]
    ent = first["entropy"]
    assert set(ent) == {"act1", "act2"}
    order = ["act1", "act2"]  # ties go to the earlier site
    assert first["chosen"] == [min(order, key=lambda n: (ent[n], order.index(n)))]
    # the recorded entropies are those of the pretraining's batches (3 steps of 32)
    assert all(0.0 <= v <= 1.0 for v in ent.values())
    state = method.state_dict()
    again = Easier(entropy_during="train-epoch")
    again.load_state_dict(state)
    assert again._counts is not None and again._counts.batches == method._counts.batches
    r1, r2 = method._counts.report(), again._counts.report()
    assert all(math.isclose(r1[n], r2[n]) for n in r1.names)


def test_from_a_checkpoint_the_first_measurement_is_a_train_mode_pass():
    torch.manual_seed(4)
    x = torch.randn(64, 5) + 2.0
    y = (x[:, 0] > 2).long()
    data = TensorDataset(x, y)
    res = easier.reduce(BNNet(), data, data, method=Easier(entropy_during="train-epoch"),
                        stop=easier.StopRule(max_removals=1),
                        finetune=FineTune(epochs=1, batch_size=32, lr=0.01))
    assert res.history[1]["chosen"] and res.history[1]["entropy"]


def test_reestimate_bn_matches_hand_statistics_and_keeps_weights():
    from easier.edit.recalibrate import reestimate_bn

    torch.manual_seed(5)
    m = BNNet()
    m.drop = nn.Dropout(0.5)  # stays off during re-estimation
    x = torch.randn(48, 5) * 2 + 1
    data = TensorDataset(x, torch.zeros(48, dtype=torch.long))
    w = {k: v.detach().clone() for k, v in m.named_parameters()}
    m.bn.momentum = 0.3
    assert reestimate_bn(m, data, batches=3, batch_size=16) == 1
    with torch.no_grad():
        a = m.fc1(x).double()
    parts = a.split(16)
    mean = sum(p.mean(0) for p in parts) / 3  # cumulative average of the batch means
    var = sum(p.var(0, unbiased=True) for p in parts) / 3
    assert torch.allclose(m.bn.running_mean.double(), mean, atol=1e-5)
    assert torch.allclose(m.bn.running_var.double(), var, atol=1e-5)
    assert m.bn.momentum == 0.3 and m.training
    assert all(torch.equal(w[k], v) for k, v in m.named_parameters())
    assert reestimate_bn(nn.Sequential(nn.Linear(2, 2)), data) == 0


def test_a_model_with_every_site_linearized_counts_nothing():
    m = easier.linearize(BNNet(), ["act1", "act2"])
    counts = TrainCounts(torch.randn(2, 5))
    counts.attach(m).remove()
    assert counts.sites == [] and counts.batches == 0
