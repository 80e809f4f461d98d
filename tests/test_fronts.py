"""Per-iteration models (RunConfig(keep_iterations=True)) and the accuracy/latency fronts."""

import copy
import importlib

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from _harness import crash_at
from easier import RunConfig, StopRule
from easier.errors import StateError
from easier.loop import reduce
from easier.methods.easier import Easier
from easier.state import RunDir, load_iteration, saved_iterations
from easier.train import FineTune

reduce_mod = importlib.import_module(reduce.__module__)


class Net(nn.Module):
    """Three ReLU sites in a small MLP: seconds-long runs, every removal foldable."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 24), nn.Linear(24, 24), nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.head(self.r3(self.fc3(self.r2(self.fc2(self.r1(self.fc1(x)))))))


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


FT = FineTune(epochs=1, lr=0.05, batch_size=32)


def run(out, method, *, resume=False, delta=100.0, run_all=False, keep=True):
    torch.manual_seed(0)
    return reduce(Net(), toy_data(), toy_data(48, 1), finetune=FT, method=method, out=out,
                  resume=resume, stop=StopRule(delta=delta, max_removals=3, run_all=run_all),
                  run=RunConfig(seed=0, keep_iterations=keep, verbose=False))


def test_every_iteration_is_kept_bit_identical_and_marked(tmp_path, monkeypatch):
    # scripted accuracies: iteration 2 falls below the floor (rejected), --all goes on to 3;
    # each evaluated model is copied as the loop holds it in memory
    accs = iter([90.0, 89.5, 70.0, 89.0])
    real = reduce_mod._evaluate_all
    seen = []

    def scripted(model, *a):
        seen.append(copy.deepcopy(model).eval())
        return {**real(model, *a), "val_acc": next(accs)}

    monkeypatch.setattr(reduce_mod, "_evaluate_all", scripted)
    res = run(tmp_path / "r", "easier", delta=1.0, run_all=True)
    hist = res.history
    assert [h["accepted"] for h in hist] == [True, True, False, False]
    assert [h["meets_threshold"] for h in hist] == [True, True, False, True]
    assert saved_iterations(tmp_path / "r") == [0, 1, 2, 3] and len(seen) == 4
    x = torch.randn(5, 8)
    for h, want in zip(hist, seen, strict=True):
        it = load_iteration(tmp_path / "r", h["iteration"], Net())
        assert (it.iteration, it.accepted, it.meets_threshold) == (
            h["iteration"], h["accepted"], h["meets_threshold"])
        assert list(it.removed) == h["removed"]
        got, ref = it.model.state_dict(), want.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        with torch.no_grad():
            assert torch.equal(it.model.eval()(x), want(x))
    # the returned model is the last accepted one (iteration 1), not the kept rejected ones
    with torch.no_grad():
        assert torch.equal(seen[1](x), res.model.eval()(x))
        assert not torch.equal(seen[3](x), seen[1](x))


def test_runs_keep_no_iterations_unless_asked(tmp_path):
    run(tmp_path / "r", "easier", keep=False)
    assert saved_iterations(tmp_path / "r") == []
    with pytest.raises(StateError, match="keep_iterations"):
        load_iteration(tmp_path / "r", 0, Net())


def test_resumed_run_keeps_the_same_iterations(tmp_path):
    whole = run(tmp_path / "whole", "easier")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", crash_at(Easier, 2))
    assert saved_iterations(tmp_path / "cut") == [0, 1]
    run(tmp_path / "cut", "easier", resume=True)
    n = len(whole.history)
    assert saved_iterations(tmp_path / "whole") == saved_iterations(tmp_path / "cut") == list(
        range(n))
    for k in range(n):
        a = load_iteration(tmp_path / "whole", k, Net()).model.state_dict()
        b = load_iteration(tmp_path / "cut", k, Net()).model.state_dict()
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_changed_iteration_file_is_refused(tmp_path):
    run(tmp_path / "r", "easier")
    path = RunDir(tmp_path / "r").iteration_file(1)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="corrupt"):
        load_iteration(tmp_path / "r", 1, Net())
