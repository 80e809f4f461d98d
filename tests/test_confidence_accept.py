"""StopRule.confidence: the loop accepts a removal only when a paired bootstrap of the val
samples bounds the drop within δ. Checked against the saved iteration models scored by hand
(plain argmax on the val tensor) and a numpy bootstrap drawn independently."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from easier import ConfigError, RunConfig, StopRule
from easier.io.records import load_iteration
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def _data(n_val: int):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300 + n_val, 6, generator=g)
    # a non-linear rule: linearizing a ReLU costs accuracy, so drops are not all zero
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2].abs() > 0.8).long())
    return TensorDataset(x[:300], y[:300]), TensorDataset(x[300:], y[300:])


def _run(out, delta, confidence, n_val=60, resume=False, max_removals=3, run_all=True):
    train, val = _data(n_val)
    return reduce(_mlp(), train, val, method="random", out=out, resume=resume,
                  finetune=FineTune(epochs=1, lr=0.001, batch_size=50),
                  pretrain=FineTune(epochs=40, lr=0.1, batch_size=50),
                  stop=StopRule(delta=delta, confidence=confidence, max_removals=max_removals,
                                run_all=run_all, bootstrap_rounds=4000),
                  run=RunConfig(seed=2, keep_iterations=True, verbose=False))


def _correct(model: nn.Module, val: TensorDataset) -> np.ndarray:
    x, y = val.tensors
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).numpy()


def _numpy_upper(base: np.ndarray, new: np.ndarray, confidence: float) -> float:
    """The ``confidence`` quantile of the resampled drop (points), numpy's own generator."""
    rng = np.random.default_rng(12345)
    n = base.size
    idx = rng.integers(0, n, size=(40000, n))
    drops = (base[idx].astype(int) - new[idx].astype(int)).sum(1) * 100.0 / n
    return float(np.quantile(drops, confidence))


@pytest.mark.slow
def test_each_decision_follows_an_independent_bootstrap(tmp_path):
    delta, conf = 8.0, 0.8
    res = _run(tmp_path / "run", delta, conf)
    _, val = _data(60)
    dense = load_iteration(tmp_path / "run", 0, _mlp()).model
    base = _correct(dense, val)
    assert base.mean() * 100 == pytest.approx(res.baseline["val_acc"])
    rows = [h for h in res.history[1:] if not h.get("failed")]
    assert rows and all("bootstrap" in h for h in rows)
    seen = set()
    for h in rows:
        new = _correct(load_iteration(tmp_path / "run", h["iteration"], _mlp()).model, val)
        assert new.mean() * 100 == pytest.approx(h["val_acc"])
        upper = _numpy_upper(base, new, conf)
        # two Monte Carlo estimates of one quantile of a lattice distribution (steps of
        # 100/60 points): they agree to within one step
        assert abs(h["bootstrap"]["upper"] - upper) <= 100 / 60 + 1e-9
        point_ok = h["val_acc"] >= res.baseline["val_acc"] - delta
        assert h["meets_threshold"] == (point_ok and h["bootstrap"]["upper"] <= delta)
        seen.add((point_ok, h["meets_threshold"]))
    # the stricter rule mattered: a drop within δ on the point estimate refused for its spread
    assert (True, False) in seen


@pytest.mark.slow
def test_confidence_refuses_what_the_point_rule_accepts(tmp_path):
    """A drop of a few samples out of 60 is within a generous δ on the point estimate, but a
    bootstrap at 99 % confidence cannot bound it there."""
    delta = 8.0
    plain = _run(tmp_path / "plain", delta, None, max_removals=3)
    strict = _run(tmp_path / "strict", delta, 0.99, max_removals=3)
    # same seeds, same choices: the models are identical, only the decisions differ
    for a, b in zip(plain.history[1:], strict.history[1:], strict=True):
        assert a["val_acc"] == b["val_acc"]
        assert b["meets_threshold"] <= a["meets_threshold"]
        if a["meets_threshold"] and not b["meets_threshold"]:
            assert b["bootstrap"]["upper"] > delta
    assert "bootstrap" not in plain.history[1]
    # a drop of 4 samples (6.7 points) passes δ=8 but not its 99 % bound (60 samples: the
    # spread of a drop of d samples is about sqrt(d)/60 · 100 points)
    assert sum(h["meets_threshold"] for h in strict.history[1:]) < \
        sum(h["meets_threshold"] for h in plain.history[1:])
    assert plain.history[1]["accepted"] and not strict.history[1]["accepted"]
    stopped = _run(tmp_path / "stopped", delta, 0.99, run_all=False)
    assert len(stopped.history) == 2 and stopped.linearized == []
    assert "within delta 8.0" in stopped.stop_reason
    assert "99% bound on the drop" in stopped.stop_reason


@pytest.mark.slow
def test_resume_keeps_the_dense_correctness(tmp_path):
    out = tmp_path / "run"
    first = _run(out, 8.0, 0.8, max_removals=1)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["baseline_correct"].dtype == torch.bool
    assert state["baseline_correct"].numel() == 60
    again = _run(out, 8.0, 0.8, resume=True, max_removals=3)
    whole = _run(tmp_path / "whole", 8.0, 0.8, max_removals=3)
    assert first.history[1]["bootstrap"] == again.history[1]["bootstrap"]
    strip = [{k: h.get(k) for k in ("val_acc", "meets_threshold", "bootstrap")}
             for h in whole.history]
    assert strip == [{k: h.get(k) for k in ("val_acc", "meets_threshold", "bootstrap")}
                     for h in again.history]


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1])
def test_confidence_outside_the_open_interval_is_refused(bad):
    with pytest.raises(ConfigError, match="confidence"):
        StopRule(confidence=bad)


@pytest.mark.parametrize("bad", ["1", "0", "x"])
def test_cli_confidence_is_one_clear_error(bad, capsys):
    from easier.cli import main

    assert main(["reduce", "--confidence", bad]) == 2
    err = capsys.readouterr().err
    assert "easier: error:" in err and "--confidence" in err and "Traceback" not in err
