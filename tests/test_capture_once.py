"""Capture once per model version (the PT2E pattern): count torch.export calls."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

import easier
from easier.graph.capture import captured, model_version


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.a1, self.a2, self.a3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.a3(self.l3(self.a2(self.l2(self.a1(self.l1(x)))))))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def count_exports(monkeypatch):
    calls = []
    real = torch.export.export

    def counted(model, *a, **k):
        calls.append(type(model).__name__)
        return real(model, *a, **k)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls


def test_a_two_iteration_reduce_captures_once_per_model_version_plus_the_fold(monkeypatch,
                                                                              tmp_path):
    calls = count_exports(monkeypatch)
    torch.manual_seed(0)
    res = easier.reduce(MLP(), data(96, 0), data(32, 1), out=tmp_path / "r", fold="all",
                        finetune=easier.FineTune(epochs=1, batch_size=32, lr=0.01),
                        stop=easier.StopRule(delta=100.0, max_removals=2),
                        run=easier.RunConfig(verbose=False))
    assert len(res.linearized) == 2
    # the dense model, one per edit (2), one for the fold of the model read back from disk;
    # before the shared capture a run like this one exported 15 times
    assert len(calls) == 4, calls


def test_the_capture_is_reused_until_an_edit_and_follows_in_place_training(monkeypatch):
    calls = count_exports(monkeypatch)
    model, x = MLP(), torch.randn(4, 6)
    sites = easier.find_sites(model, x)
    easier.measure_entropy(model, [(x, torch.zeros(4))])
    easier.measure(model, torch.randn(2, 6), latency=False)  # another batch size: same graph
    assert len(calls) == 1
    with torch.no_grad():  # training changes weights in place: the shared graph sees them
        model.l1.weight.mul_(-1.0)
    cap = captured(model, x)
    assert len(calls) == 1
    torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)
    edited = easier.linearize(model, [sites[0].name], example_input=x)
    assert model_version(edited) != model_version(model)
    assert len(easier.find_sites(edited, x)) == 2 and len(calls) == 2  # a new version: once
    model.a2 = nn.Identity()  # an in-place edit of the module tree is a new version too
    assert len(easier.find_sites(model, x)) == 2 and len(calls) == 3
