import importlib
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import easier
from _harness import crash_at, history_rows, tiny_run
from easier import SiteError, StopRule
from easier.edit.linearize import Linearized, edits_of
from easier.graph.capture import capture, node_scope
from easier.io.records import load_model, save_model
from easier.merge import fold
from easier.methods import Context, create_method
from easier.methods.layer_folding import (
    SLOPES,
    LayerFolding,
    add_slopes,
    drop_slopes,
    slope_values,
)
from easier.models import create
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune, TrainResult

reduce_mod = importlib.import_module("easier.pipeline.iteration")  # the loop body, to monkeypatch

X6 = torch.randn(2, 6)  # example input of MLP and InPlace (captures find their sites)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.act(self.fc1(x)))))


class InPlace(nn.Module):
    """The three in-place spellings: module, function and tensor method."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.relu(self.fc1(x), inplace=True)
        x = self.act(self.fc2(x))
        return self.fc3(x).relu_()


def set_alpha(model, **values):
    mixer = getattr(model, SLOPES)
    with torch.no_grad():
        for site, v in values.items():
            mixer.alpha[mixer.sites[site]].fill_(v)


def convnet():
    return create("convnet", width=0.25, image_size=8, num_classes=3).eval()


def test_slopes_are_exact_at_init_and_identity_at_alpha_one():
    m = convnet()
    x = torch.randn(4, 3, 8, 8)
    s = add_slopes(m)
    names = [site.name for site in easier.find_sites(m)]
    assert [site.name for site in easier.find_sites(s)] == names  # sites kept, same names
    assert torch.equal(s(x), m(x))
    assert slope_values(s) == dict.fromkeys(names, 0.0)
    set_alpha(s, relu2=1.0)
    assert torch.equal(s(x), easier.linearize(m, ["relu2"])(x))
    set_alpha(s, relu2=0.0)
    assert torch.equal(s(x), m(x))
    assert edits_of(s) == [{"op": "slopes", "action": "add", "sites": names}]


def test_mix_matches_hand_computation_and_linearize_under_it_is_exact():
    m = MLP()
    s = add_slopes(m, example_input=X6)
    assert list(slope_values(s)) == ["act", ":relu"]
    set_alpha(s, act=0.3, **{":relu": 0.8})
    x = torch.randn(5, 6)
    with torch.no_grad():
        h = m.fc1(x)
        h = 0.3 * h + 0.7 * h.relu()
        h = m.fc2(h)
        h = 0.8 * h + (1 - 0.8) * h.relu()
        torch.testing.assert_close(s(x), m.fc3(h))
    # linearizing a site under its mix gives the mix (x, x): exactly x whatever alpha is
    lin = easier.linearize(s, ["act"])
    set_alpha(s, act=1.0)
    assert torch.equal(lin(x), s(x))
    assert list(slope_values(lin)) == [":relu"]


def test_in_place_activations_become_out_of_place():
    torch.manual_seed(0)
    m = InPlace()
    x = torch.randn(5, 6)
    s = add_slopes(m, example_input=X6)
    assert torch.equal(s(x), m(x))
    assert m.act.inplace and not s.act.inplace  # the original is left as it was
    for site in slope_values(s):
        set_alpha(s, **{site: 1.0})
        assert torch.equal(s(x), easier.linearize(m, [site])(x)), site
        set_alpha(s, **{site: 0.0})

    class Shared(nn.Module):
        def forward(self, x):
            return F.relu(x, inplace=True) + x  # x is read again after the in-place ReLU

    with pytest.raises(SiteError, match="in-place"):
        add_slopes(Shared(), example_input=torch.randn(4, 6))


def test_penalty_value_gradient_and_effect():
    s = add_slopes(MLP(), example_input=X6)
    set_alpha(s, act=0.2, **{":relu": 0.6})
    reg = LayerFolding(lam=0.5).regularizer()
    r = reg(s)
    # the reference's sum (one term per slope): 0.5 * (|1 - 0.04| + |1 - 0.36|) = 0.8
    assert float(r.detach()) == pytest.approx(0.8)
    r.backward()
    mixer = getattr(s, SLOPES)
    grads = [float(mixer.alpha[k].grad) for k in ("act", "_relu")]
    assert grads == pytest.approx([-0.2, -0.6])  # d/da 0.5*(1-a^2) = -a
    # optimized alone, the penalty pushes every slope up and after_step keeps it in [0, 1]
    method = LayerFolding(lam=0.5)
    opt = torch.optim.SGD(mixer.parameters(), lr=2.0)
    seen = [slope_values(s)]
    for _ in range(6):
        opt.zero_grad()
        reg(s).backward()
        opt.step()
        method.after_step(s)
        seen.append(slope_values(s))
    for site in ("act", ":relu"):
        path = [v[site] for v in seen]
        assert all(b >= a for a, b in itertools.pairwise(path)) and path[-1] == 1.0
    # "square" has a non-zero pull at the initial alpha = 0, "abs" has none there
    z = add_slopes(MLP(), example_input=X6)
    LayerFolding(lam=1.0, penalty="square").regularizer()(z).backward()
    assert float(getattr(z, SLOPES).alpha["act"].grad) == pytest.approx(-2.0)  # -2*lam*(1-0)
    z = add_slopes(MLP(), example_input=X6)
    LayerFolding(lam=1.0).regularizer()(z).backward()
    assert float(getattr(z, SLOPES).alpha["act"].grad) == 0.0
    # a linearized site leaves the penalty
    lin = easier.linearize(s, ["act"])
    set_alpha(lin, **{":relu": 0.5})
    assert float(reg(lin).detach()) == pytest.approx(0.5 * 0.75)


def test_after_step_clamps_to_unit_interval():
    s = add_slopes(MLP(), example_input=X6)
    set_alpha(s, act=-0.4, **{":relu": 1.7})
    LayerFolding().after_step(s)
    assert slope_values(s) == {"act": 0.0, ":relu": 1.0}


def ctx_for(model, k=1):
    remaining = LayerFolding().units(model)
    return Context(
        model=model,
        remaining=remaining,
        removed=[],
        k=k,
        iteration=1,
        rng=random.Random(0),
        fold_ready=False,
    )


def test_step_linearizes_the_largest_slopes():
    s = add_slopes(convnet())
    alphas = {"relu1": 0.1, "relu2": 0.8, "relu3": 0.5, "relu4": 0.3}
    set_alpha(s, **alphas)
    step = LayerFolding().step(ctx_for(s))
    assert step.chosen == ["relu2"]
    assert step.scores == pytest.approx({n: 1 - a for n, a in alphas.items()})
    new = step.model
    assert easier.linearized_sites(new) == ["relu2"]
    assert list(slope_values(new)) == ["relu1", "relu3", "relu4"]
    # the mix is gone (its alpha too), so the chain can fold: relu2 is a plain linearized module
    assert "relu2" not in getattr(new, SLOPES).sites
    assert not any("relu2" in k for k in new.state_dict() if k.startswith(SLOPES))
    assert isinstance(new.relu2, Linearized)
    x = torch.randn(3, 3, 8, 8)
    set_alpha(s, relu2=1.0)
    assert torch.equal(new(x), s(x))  # linearized = that slope at 1
    assert LayerFolding().step(ctx_for(s, k=2)).chosen == ["relu2", "relu3"]


def test_edited_model_round_trips_through_save_and_load(tmp_path):
    s = add_slopes(convnet())
    set_alpha(s, relu1=0.25, relu2=0.75, relu3=0.5, relu4=0.125)
    new = LayerFolding().step(ctx_for(s)).model.eval()
    save_model(new, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")  # architecture from the spec + edits, weights_only
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(back.eval()(x), new(x))
    assert slope_values(back) == slope_values(new)
    assert [e["op"] for e in edits_of(back)] == ["slopes", "slopes", "linearize"]
    drop = edits_of(back)[1]
    assert drop == {"op": "slopes", "action": "drop", "sites": ["relu2"]}


def test_options_and_units():
    with pytest.raises(easier.ConfigError, match="penalty"):
        create_method("layer-folding", penalty="l1")
    with pytest.raises(easier.ConfigError, match="activation kind"):
        create_method("layer-folding", kinds=["Tanh"])
    assert LayerFolding().units(convnet()) == []  # no slopes, nothing to remove
    with pytest.raises(SiteError, match="no slope"):
        drop_slopes(add_slopes(MLP(), example_input=X6), ["nope"])


def test_loop_stops_at_the_first_drop(monkeypatch):
    seq = iter([90.0, 89.5, 88.0])
    monkeypatch.setattr(
        reduce_mod, "fine_tune", lambda *a, **k: TrainResult(epochs=1, loss=0.1, accuracy=50.0)
    )
    monkeypatch.setattr("easier.pipeline.scores.evaluate", lambda *a, **k: (0.5, next(seq)))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    res = reduce(MLP(), data, data, method="layer-folding", finetune=FineTune(batch_size=16),
                 stop=StopRule(delta=1.0))
    assert [h["accepted"] for h in res.history] == [True, True, False]
    alpha = res.history[1]["alpha"]  # trained by the warm-up (no pretraining ran)
    assert res.history[1]["warmup"]["steps"] == 2 and len(set(alpha.values())) == 2
    assert res.linearized == res.history[1]["removed"] == [max(alpha, key=alpha.get)]
    assert easier.linearized_sites(res.model) == res.linearized
    assert "88.00 < baseline 90.00" in res.stop_reason


def run(out, method="layer-folding", resume=False, max_removals=2):
    return tiny_run(out, method, resume=resume, max_removals=max_removals)


def rows(d):
    return history_rows(d)


@pytest.fixture
def one_thread():
    """Tiny tensors run faster on one thread, and a loaded 2-core box does not stall them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_result_folds(tmp_path, one_thread):
    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", method=crash_at(LayerFolding, 2))
    assert len(rows(tmp_path / "cut")) == 2
    resumed = run(tmp_path / "cut", resume=True)
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    # a run stopped by a small budget continues when resumed with the full one
    run(tmp_path / "short", max_removals=1)
    assert run(tmp_path / "short", resume=True).linearized == full.linearized
    assert rows(tmp_path / "short") == rows(tmp_path / "full")
    assert resumed.linearized == full.linearized and len(full.linearized) == 2
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # training moved the slopes off 0 (task loss) and kept them in [0, 1]
    alphas = slope_values(full.model)
    assert len(alphas) == 2 and all(0.0 <= v <= 1.0 for v in alphas.values())
    assert any(v > 0 for v in full.history[1]["alpha"].values())
    # two mixes remain: fold keeps them as opaque nodes and still verifies
    x = torch.randn(2, 3, 8, 8)
    folded = fold(full.model.eval(), x, plan="all")
    torch.testing.assert_close(folded(x), full.model(x), rtol=1e-4, atol=1e-5)
    def scope(n):
        return node_scope(n)[0]

    mixes = [n for n in folded.graph.nodes
             if n.op == "call_function" and "add" in str(n.target) and scope(n) == SLOPES]
    assert len(mixes) == 2

    def layers(gm):  # conv ops plus residual additions (a residual add merges into a conv)
        return len([n for n in gm.graph.nodes if n.op == "call_function" and scope(n) != SLOPES
                    and ("conv" in str(n.target) or "add" in str(n.target))])

    dense = capture(full.model, x).gm
    assert layers(folded) < layers(dense)  # a chain merged across the linearized sites


# ---------------------------------------------------------------------------------------------
# from a trained checkpoint: the slopes are trained before the first ranking


class TwoSites(nn.Module):
    """Logit ``4 * (|u| - 1 + relu(v))`` for the label ``|u| - 1 + v > 0``.

    Site ``act_a`` builds ``|u| = relu(u) + relu(-u)``: a slope ``alpha`` there scales it by
    ``1 - alpha``, which only hurts. Site ``act_b`` passes ``v`` but drops its negative part,
    which the label needs: a slope there helps. So training raises ``alpha_b``, not
    ``alpha_a``, although ``act_a`` comes first in model order (where a tie at 0 would go).
    """

    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.head = nn.Linear(2, 2), nn.Linear(2, 1), nn.Linear(3, 2)
        self.act_a, self.act_b = nn.ReLU(), nn.ReLU()
        with torch.no_grad():
            self.fa.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
            self.fb.weight.copy_(torch.tensor([[0.0, 1.0]]))
            self.head.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [4.0, 4.0, 4.0]]))
            self.head.bias.copy_(torch.tensor([0.0, -4.0]))
            self.fa.bias.zero_()
            self.fb.bias.zero_()

    def forward(self, x):
        return self.head(torch.cat([self.act_a(self.fa(x)), self.act_b(self.fb(x))], 1))


def two_site_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return TensorDataset(x, (x[:, 0].abs() - 1 + x[:, 1] > 0).long())


def test_from_a_checkpoint_the_slopes_are_trained_before_the_ranking():
    torch.manual_seed(0)
    s = add_slopes(TwoSites(), example_input=torch.randn(2, 2))
    assert set(slope_values(s).values()) == {0.0}  # the tie the old code broke by model order
    ctx = Context(model=s, remaining=["act_a", "act_b"], removed=[], k=1, iteration=1,
                  rng=random.Random(0), train_eval=two_site_data(256, 0), batch_size=32,
                  fold_ready=False)
    method = LayerFolding(warmup_epochs=2, warmup_lr=0.1)
    step = method.step(ctx)
    alpha = step.info["alpha"]
    assert step.info["warmup"]["steps"] == 16 and method.trained_steps == 16
    assert alpha["act_b"] > 0.05 and alpha["act_a"] < alpha["act_b"], alpha
    assert step.chosen == ["act_b"]
    assert set(slope_values(s).values()) == {0.0}  # a copy was trained
    # refused, not silently ranked, when the warm-up is off and nothing trained the slopes
    with pytest.raises(easier.ConfigError, match="warmup_epochs"):
        LayerFolding(warmup_epochs=0).step(ctx)


def test_no_warm_up_after_pretraining():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    res = reduce(MLP(), data, data, method="layer-folding",
                 pretrain=FineTune(batch_size=16, max_steps=1), finetune=FineTune(batch_size=16),
                 stop=StopRule(delta=100.0, max_removals=1))
    assert "warmup" not in res.history[1]


def test_penalty_sums_over_active_slopes_like_the_reference():
    """One term per slope, as the pre-fold script's ``for ai in alpha_arr: loss += ...``."""
    s = add_slopes(create("resnet18", num_classes=3, width=0.125, image_size=8))
    mixer = getattr(s, SLOPES)
    values = [0.05 * i for i in range(len(mixer.sites))]
    with torch.no_grad():
        for key, v in zip(mixer.sites.values(), values, strict=True):
            mixer.alpha[key].fill_(v)
    hand = 0.25 * sum(abs(1 - v * v) for v in values)
    assert float(LayerFolding().regularizer()(s).detach()) == pytest.approx(hand, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# models torch.fx cannot trace: a Hugging Face ResNet, data-dependent control flow


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it (hook fallback)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(6, 8), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(8, 8), nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act1(self.fc1(x))
        if h.sum() > -1e9:  # data-dependent branch (always taken)
            h = self.act2(self.fc2(h))
        return self.head(h)


def test_slopes_on_a_model_export_cannot_capture_match_hand_computation():
    torch.manual_seed(0)
    m = DataDependent().eval()
    with pytest.warns(easier.EasierWarning, match="could not capture"):
        s = add_slopes(m, example_input=X6)
    assert list(slope_values(s)) == ["act1", "act2"]
    set_alpha(s, act1=0.25, act2=0.5)
    x = torch.randn(5, 6)
    with torch.no_grad():
        h = m.fc1(x)
        h = 0.25 * h + 0.75 * h.relu()
        h = m.fc2(h)
        h = 0.5 * h + 0.5 * h.relu()
        torch.testing.assert_close(s(x), m.head(h))
    assert list(s.state_dict()) == [*m.state_dict(), f"{SLOPES}.alpha.act1", f"{SLOPES}.alpha.act2"]


@pytest.mark.slow
def test_layer_folding_reduces_a_hf_resnet_end_to_end(tmp_path):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic",
                         num_labels=2)
    model = T.ResNetForImageClassification(cfg)
    with pytest.raises(Exception):  # noqa: B017  (the point: fx fails on this model)
        torch.fx.symbolic_trace(model)
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(32, 3, 16, 16, generator=g)
    data = [{"pixel_values": p, "labels": (p[0].mean() > 0).long()} for p in pix]
    res = reduce(model, data[:24], data[24:], method="layer-folding",
                 stop=easier.StopRule(delta=100.0, max_removals=1), out=tmp_path / "run",
                 pretrain=FineTune(batch_size=8, max_steps=2),
                 finetune=FineTune(batch_size=8, max_steps=2))
    sites = [n for n, mod in model.named_modules() if isinstance(mod, nn.ReLU)]
    alpha = res.history[1]["alpha"]
    assert list(alpha) == sites and len(sites) == 3 and any(a > 0 for a in alpha.values())
    assert res.linearized == [min(sites, key=lambda n: (1 - alpha[n], sites.index(n)))]
    assert list(slope_values(res.model)) == [n for n in sites if n not in res.linearized]
    assert isinstance(res.model.get_submodule(res.linearized[0]), Linearized)
    # the run directory's checkpoint rebuilds the edited model (slopes + linearize) exactly
    back = load_model(tmp_path / "run" / "model.pt",
                      model=T.ResNetForImageClassification(cfg))
    x = {"pixel_values": pix[:3]}
    with torch.no_grad():
        assert torch.equal(back.eval()(**x).logits, res.model.eval()(**x).logits)
