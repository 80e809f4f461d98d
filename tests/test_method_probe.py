"""probe against a brute force written in the test: linearize each site with easier.linearize,
re-estimate BN, compute the loss by hand on the same slice of the training data."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

import easier
from easier.edit.recalibrate import reestimate_bn
from easier.errors import ConfigError
from easier.graph.sites import find_sites
from easier.methods import Context, create_method
from easier.methods.probe import Probe
from easier.models import create

BS, BN_B, LOSS_B, SEED = 16, 2, 3, 5


class Raising(Dataset):
    """A validation set that fails the test if anything reads it."""

    def __len__(self):
        raise AssertionError("val was read")

    def __getitem__(self, i):
        raise AssertionError("val was read")


def make(n=160):
    torch.manual_seed(0)
    model = create("convnet", width=0.25, image_size=8, num_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BN statistics, so a stale one would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    return model, TensorDataset(x, y), x


def context(model, data, x, k=1):
    names = [s.name for s in find_sites(model, x[:2])]
    return Context(model=model, remaining=names, removed=[], k=k, iteration=1,
                   rng=random.Random(0), train_eval=data, val=Raising(), batch_size=BS,
                   example=x[:2])


def brute_force(model, data, sites):
    """{site: loss} with the test's own linearize + BN + loss, on the documented slice."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED)).tolist()
    bn_part = Subset(data, perm[:BN_B * BS])
    xs, ys = data.tensors
    loss_idx = torch.tensor(perm[BN_B * BS:(BN_B + LOSS_B) * BS])
    out = {}
    for site in [None, *sites]:
        lin = model if site is None else easier.linearize(model, [site])
        lin = copy.deepcopy(lin)
        reestimate_bn(lin, bn_part, batches=BN_B, batch_size=BS)
        with torch.no_grad():
            out[site] = float(F.cross_entropy(lin.eval()(xs[loss_idx]), ys[loss_idx]))
    return out


def test_chosen_site_is_the_brute_force_argmin():
    model, data, x = make()
    ctx = context(model, data, x)
    assert len(ctx.remaining) >= 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = Probe(bn_batches=BN_B, loss_batches=LOSS_B, seed=SEED).step(ctx)  # val raises
    want = brute_force(model, data, ctx.remaining)
    for site in ctx.remaining:
        assert step.scores[site] == pytest.approx(want[site], rel=1e-5), site
    assert step.info["probe_base_loss"] == pytest.approx(want[None], rel=1e-5)
    argmin = min(ctx.remaining, key=lambda s: want[s])
    assert step.chosen == [argmin]
    assert len(set(round(want[s], 4) for s in ctx.remaining)) == len(ctx.remaining)  # no ties
    assert step.model is not model and easier.linearized_sites(step.model) == [argmin]
    # the model probed is left as it was: weights, BN statistics, modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == [type(m) for m in make()[0].modules()]
    cost = step.info["probe_cost"]
    assert cost["candidates"] == len(ctx.remaining) and cost["seconds"] > 0
    assert cost["forwards"] == (len(ctx.remaining) + 1) * (BN_B + LOSS_B)


def test_one_shot_removes_the_k_cheapest():
    model, data, x = make()
    ctx = context(model, data, x, k=2)
    step = Probe(bn_batches=BN_B, loss_batches=LOSS_B, seed=SEED).step(ctx)
    want = brute_force(model, data, ctx.remaining)
    assert set(step.chosen) == set(sorted(ctx.remaining, key=want.get)[:2])


def test_a_small_training_set_is_split_not_refused():
    model, data, x = make(n=40)  # fewer than (2 + 3) * 16 samples
    step = Probe(bn_batches=BN_B, loss_batches=LOSS_B).step(context(model, data, x))
    assert len(step.chosen) == 1
    # 40 * 2 // 5 = 16 samples re-estimate BN (one batch), 24 measure (two batches)
    assert step.info["probe_cost"]["forwards"] == (len(step.scores) + 1) * 3


def test_options_and_errors():
    with pytest.raises(ConfigError, match="loss_batches"):
        create_method("probe", loss_batches=0)
    with pytest.raises(ConfigError, match="price"):
        create_method("probe", price="energy")
    assert create_method("probe", price="flops").options() == {
        "bn_batches": 8, "loss_batches": 4, "seed": 0, "price": "flops", "lookahead": True,
        "batch_sizes": [1]}
    model, data, x = make()
    ctx = context(model, data, x)
    ctx.train_eval = None
    with pytest.raises(ConfigError, match="training data"):
        Probe().step(ctx)


def test_priced_probe_ranks_by_loss_increase_per_flop():
    model, data, x = make()
    ctx = context(model, data, x)
    step = Probe(bn_batches=BN_B, loss_batches=LOSS_B, seed=SEED, price="flops").step(ctx)
    base, gain = step.info["probe_base_loss"], step.info["fold_saving"]
    priced = step.info["priced"]
    paying = [s for s in ctx.remaining if gain[s] > 0]
    assert paying  # a conv followed by a conv folds
    for s in ctx.remaining:  # the price, recomputed by hand from the recorded parts
        rise = step.scores[s] - base
        if gain[s] <= 0:
            assert priced[s] is None
        else:
            assert priced[s] == pytest.approx(rise / gain[s] if rise > 0 else rise * gain[s])
    assert step.chosen == [min(paying, key=lambda s: priced[s])]


def test_listed_and_runs_through_reduce(tmp_path, capsys, one_thread):
    from _harness import tiny_run
    from easier.cli import main

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out.split()
    assert "probe" in listed and "taylor" in listed
    res = tiny_run(tmp_path / "run", "probe", max_removals=1)
    assert len(res.linearized) == 1
    row = res.history[1]
    assert row["removed"] == res.linearized
    assert row["probe_cost"]["candidates"] == len(row["scores"]) >= 2


@pytest.mark.slow
def test_compare_runs_probe_and_taylor(tmp_path, one_thread):
    from torch import nn

    from easier import RunConfig, StopRule
    from easier.pipeline.compare import compare
    from easier.train.finetune import FineTune

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
            self.r1, self.r2 = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.head(self.r2(self.fc2(self.r1(self.fc1(x)))))

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())

    def make_model():
        torch.manual_seed(0)
        return Net()

    rows = compare(make_model, data(96, 0), data(48, 1), methods=["probe", "taylor"],
                   out=tmp_path / "cmp", plan="flops",
                   method_options={"probe": {"bn_batches": 1, "loss_batches": 1}},
                   finetune=FineTune(epochs=1, lr=0.05, batch_size=32),
                   stop=StopRule(delta=100.0, max_removals=1),
                   run=RunConfig(seed=0, verbose=False))
    assert [r["method"] for r in rows] == ["probe", "taylor"]
    for name in ("probe", "taylor"):
        assert (tmp_path / "cmp" / name / "history.jsonl").exists()
