import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from easier import ConfigError, FineTune
from easier.train.finetune import _optimizer, _scheduler, evaluate, fine_tune, make_loader


def data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def test_finetune_config_validation_and_roundtrip():
    ft = FineTune(epochs=2, milestones=[1], schedule="multistep")
    assert FineTune.from_dict(ft.to_dict()) == ft
    with pytest.raises(ConfigError, match="valid"):
        FineTune(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="unknown FineTune field"):
        FineTune.from_dict({"epochs": 1, "lrr": 0.1})


def test_loader_order_depends_only_on_seed():
    a = [b[1].tolist() for b in make_loader(data(), 8, shuffle=True, seed=3)]
    torch.manual_seed(123)  # global RNG must not matter
    b = [b[1].tolist() for b in make_loader(data(), 8, shuffle=True, seed=3)]
    c = [b[1].tolist() for b in make_loader(data(), 8, shuffle=True, seed=4)]
    assert a == b and a != c


def test_cosine_schedule_decays_to_zero_per_step():
    model = nn.Linear(2, 2)
    cfg = FineTune(epochs=2, lr=0.1, schedule="cosine")
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_fine_tune_learns_and_reports_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    before = evaluate(model, data())[1]
    res = fine_tune(model, data(), FineTune(epochs=5, lr=0.1, batch_size=16))
    assert res.epochs == 5 and res.steps == 20 and res.failed is None
    assert evaluate(model, data())[1] > max(before, 80.0)
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    bad = fine_tune(model, data(), FineTune(epochs=1, batch_size=16))
    assert bad.failed is not None and "non-finite loss" in bad.failed and bad.steps == 0


def test_amp_bfloat16_trains_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    w0 = model[0].weight.detach().clone()
    res = fine_tune(model, data(), FineTune(epochs=1, lr=0.1, batch_size=16), amp=True)
    assert res.failed is None and math.isfinite(res.loss)
    assert model[0].weight.dtype == torch.float32 and not torch.equal(w0, model[0].weight)
