"""taylor against finite differences of a hand-written forward pass, in float64.

The model: x -> fc1 -> a (ReLU module) -> fc2 -> F.relu (functional site) -> fc3 -> c -> head.
The test's own forward moves one site a fraction t of the way to the identity,
``σ(z) + t·(z − σ(z))``, and (L(t) − L(0)) / t must approach the estimate as t -> 0.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from easier.errors import ConfigError
from easier.graph.sites import find_sites
from easier.methods import Context, create_method
from easier.methods.taylor import Taylor

D, W, K, N = 6, 16, 4, 192


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(D, W), nn.Linear(W, W), nn.Linear(W, W)
        self.head = nn.Linear(W, K)
        self.a, self.c = nn.ReLU(inplace=True), nn.ReLU()  # in place: z must survive

    def forward(self, x):
        return self.head(self.c(self.fc3(F.relu(self.fc2(self.a(self.fc1(x))), inplace=True))))


def make(shift_c=0.0, seed=0):
    torch.manual_seed(seed)
    model = Net().double().eval()
    with torch.no_grad():
        model.fc3.bias += shift_c  # c's pre-activation moved toward its linear region
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    return model, TensorDataset(x, y), x, y


def sites_of(model, x):
    return [s.name for s in find_sites(model, x[:2])]


def hand_loss(model, x, y, site, t):
    """Mean cross-entropy with ``site`` (index 0, 1, 2 in model order) moved by t."""
    def act(z, i):
        r = torch.relu(z)
        return r + t * (z - r) if i == site else r

    with torch.no_grad():
        h = act(model.fc1(x), 0)
        h = act(model.fc2(h), 1)
        h = act(model.fc3(h), 2)
        return float(F.cross_entropy(model.head(h), y))


def context(model, data, x, remaining, k=1):
    return Context(model=model, remaining=list(remaining), removed=[], k=k, iteration=1,
                   rng=random.Random(0), train_eval=data, batch_size=64, example=x[:2])


def test_estimate_is_the_derivative_of_the_partial_linearization():
    model, data, x, y = make()
    names = sites_of(model, x)
    assert len(names) == 3 and names[0] == "a" and ":relu" in names[1]  # module + functional
    method = Taylor(batches=N // 64)  # every sample
    est = method.estimate(context(model, data, x, names))
    l0 = [hand_loss(model, x, y, i, 0.0) for i in range(3)]
    for i, name in enumerate(names):
        fd = [(hand_loss(model, x, y, i, t) - l0[i]) / t for t in (1e-3, 1e-5, 1e-7)]
        # first order: the error shrinks with t, and at t = 1e-7 the quotient is the estimate
        assert abs(fd[2] - est[name]) < abs(fd[0] - est[name]) + 1e-12
        assert fd[2] == pytest.approx(est[name], rel=1e-5, abs=1e-9), name
        assert abs(est[name]) > 1e-6  # a real, non-trivial change


def test_an_already_linear_site_is_exactly_zero_and_a_nearly_linear_one_ranks_first():
    model, data, x, _ = make(shift_c=100.0)  # c's pre-activations all > 0: c is the identity
    names = sites_of(model, x)
    est = Taylor(batches=3).estimate(context(model, data, x, names))
    assert est["c"] == 0.0
    # nearly linear: pre-activations positive but for a few percent of the values
    model, data, x, _ = make()
    with torch.no_grad():
        z = model.fc3(F.relu(model.fc2(model.a(model.fc1(x)))))
        model.fc3.bias -= torch.quantile(z, 0.03, dim=0)  # ~3% of each unit's values < 0
        z = model.fc3(F.relu(model.fc2(model.a(model.fc1(x)))))
    assert 0.0 < float((z < 0).double().mean()) < 0.06  # as built
    step = Taylor(batches=3, absolute=True).step(context(model, data, x, names))
    assert step.chosen == ["c"]
    assert step.scores["c"] < min(step.scores[n] for n in names if n != "c") / 5
    assert set(step.info["taylor_signed"]) == set(names)


def test_affine_mode_estimates_the_fitted_stand_in():
    """With the run's affine mode the change is a·z + b − σ(z): check by finite differences."""
    model, data, x, y = make()
    names = sites_of(model, x)
    ctx = context(model, data, x, names)
    ctx.linearize_mode = "affine"
    est = Taylor(batches=3).estimate(ctx)
    fit = ctx.affine_fits(model)["a"]
    a, b = fit.a.reshape(-1), fit.b.reshape(-1)

    def loss(t):
        with torch.no_grad():
            z = model.fc1(x)
            r = torch.relu(z)
            h = r + t * (z * a + b - r)
            h = model.c(model.fc3(F.relu(model.fc2(h))))
            return float(F.cross_entropy(model.head(h), y))

    t = 1e-7
    assert (loss(t) - loss(0.0)) / t == pytest.approx(est["a"], rel=1e-5, abs=1e-9)
    identity = Taylor(batches=3).estimate(context(model, data, x, names))
    assert est["a"] != pytest.approx(identity["a"])  # it did estimate a different change


def test_model_is_untouched_and_val_is_never_read():
    class Raising(torch.utils.data.Dataset):
        def __len__(self):
            raise AssertionError("val was read")

        def __getitem__(self, i):
            raise AssertionError("val was read")

    model, data, x, _ = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = context(model, data, x, sites_of(model, x))
    ctx.val = Raising()
    step = Taylor().step(ctx)
    assert len(step.chosen) == 1 and step.model is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.a, nn.ReLU)  # no switch left behind
    assert all(p.grad is None for p in model.parameters())


def test_options():
    with pytest.raises(ConfigError, match="price"):
        create_method("taylor", price="energy")
    with pytest.raises(ConfigError, match="batches"):
        create_method("taylor", batches=0)
    assert create_method("taylor", absolute=True).options() == {
        "batches": 4, "absolute": True, "price": None}


def test_price_divides_by_the_fold_saving():
    """price='flops': every site of this MLP folds; the score order becomes cost per FLOP."""
    model, data, x, _ = make()
    names = sites_of(model, x)
    step = Taylor(batches=3, absolute=True, price="flops").step(context(model, data, x, names))
    gain, priced = step.info["fold_saving"], step.info["priced"]
    # by hand, example batch of 2: fc1∘fc2 (D->W->W) -> one D->W linear saves W*W MACs per
    # sample, fc2∘fc3 the same, fc3∘head (W->W->K) -> W->K saves W*W; FLOPs = 2 MACs. Sites
    # a and F.relu are in place (relu_): priced as foldable, as they are once linearized
    assert gain == {n: 2 * 2 * W * W for n in names}
    for n in names:
        assert priced[n] == pytest.approx(step.scores[n] / gain[n])
    assert step.chosen == [min(names, key=lambda n: priced[n])]


def test_runs_through_reduce(tmp_path, one_thread):
    """One iteration of the loop on a conv net with BN and in-place ReLUs."""
    from _harness import tiny_run

    res = tiny_run(tmp_path / "run", "taylor", max_removals=1)
    assert len(res.linearized) == 1
    row = res.history[1]
    assert row["removed"] == res.linearized
    assert row["removed"][0] == min(row["scores"], key=row["scores"].get)
    assert row["taylor_cost"]["candidates"] == len(row["scores"]) >= 2
