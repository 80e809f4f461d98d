import copy
import importlib
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import easier
from _harness import crash_at, history_rows, tiny_run
from easier import StopRule
from easier.merge import fold
from easier.methods import Context, create_method
from easier.methods.tlc import TLC, collapse_plans, select_joint
from easier.models import create
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune, TrainResult, fine_tune

reduce_mod = importlib.import_module("easier.pipeline.iteration")  # the loop body, to monkeypatch


class BNNet(nn.Module):
    """conv-BN-ReLU twice, pool, linear: two sites, each with a BN in front."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    """Linear-ReLU-Linear without BN: the statistics path."""

    def __init__(self):
        super().__init__()
        self.fc1, self.relu1, self.fc2 = nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.relu1(self.fc1(x)))


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def context(model, val, remaining, k=1, fold_ready=True):
    return Context(
        model=model,
        remaining=remaining,
        removed=[],
        k=k,
        iteration=1,
        rng=random.Random(0),
        val=val,
        batch_size=16,
        fold_ready=fold_ready,
        example=val.tensors[0][:2],
    )


def set_bn(bn, beta, gamma=None):
    with torch.no_grad():
        bn.bias.copy_(torch.tensor(beta))
        if gamma is not None:
            bn.weight.copy_(torch.tensor(gamma))


@pytest.fixture
def one_thread():
    """Tiny tensors run faster on one thread, and a loaded 2-core box does not stall them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_masks_exactly_the_nonpositive_beta_channels_and_keeps_them_zero(one_thread):
    model = BNNet()
    set_bn(model.bn1, [0.5, -0.3, 0.0, 0.2, -1.0, 0.7], [1.0, 0.5, 2.0, 1.5, 0.3, 1.0])
    before = copy.deepcopy(model.state_dict())
    off = model.bn1.bias.detach() <= 0
    method = TLC()
    step = method.step(context(model, images(32, 1), ["relu1"]))
    new = step.model
    assert step.chosen == ["relu1"] and easier.linearized_sites(new) == ["relu1"]
    sd = new.state_dict()
    for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"):
        assert torch.all(sd[name][off] == 0), name
        assert torch.equal(sd[name][~off], before[name][~off]), name
    for name in ("conv2.weight", "bn2.weight", "bn2.bias", "fc.weight"):
        assert torch.equal(sd[name], before[name]), name
    masks = method.state_dict()["masks"]
    assert set(masks) == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"}
    assert all(torch.equal(m, off) for m in masks.values())
    assert step.info["tlc"]["sites"]["relu1"]["off"] == 3
    # the removed channels are exactly zero where the activation used to be
    x = images(4, 2).tensors[0]
    new.eval()
    pre = new.bn1(new.conv1(x))
    assert torch.all(pre[:, off] == 0) and torch.all(pre[:, ~off] != 0)

    # fine-tuning moves the kept weights but never the removed ones
    res = fine_tune(
        new, images(64, 3), FineTune(epochs=2, lr=0.2, batch_size=16), after_step=method.after_step
    )
    assert res.steps == 8
    sd = new.state_dict()
    for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"):
        assert torch.all(sd[name][off] == 0), name
        assert not torch.equal(sd[name][~off], before[name][~off]), name


def self_labelled(model, n=32, seed=1):
    """Validation data labelled by the model itself: any change of its function costs loss."""
    x = images(n, seed).tensors[0]
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    return TensorDataset(x, y)


def masked_by_hand(model, bn, conv):
    """The OFF channels (beta <= 0) zeroed by module name, no plan."""
    m = copy.deepcopy(model).eval()
    off = getattr(m, bn).bias.detach() <= 0
    with torch.no_grad():
        for p in (getattr(m, bn).weight, getattr(m, bn).bias, getattr(m, conv).weight):
            p[off] = 0
        if getattr(m, conv).bias is not None:
            getattr(m, conv).bias[off] = 0
    return m


def independent_gap(model, site, bn, conv, val):
    """Collapse by hand (module names, the ReLU module swapped for an identity, padding left
    where it is) and return the loss gap on the first batch."""
    x, y = val.tensors[0][:16], val.tensors[1][:16]
    m = masked_by_hand(model, bn, conv)
    setattr(m, site, nn.Identity())
    with torch.no_grad():
        return float(F.cross_entropy(m(x), y) - F.cross_entropy(model.eval()(x), y))


def test_chosen_site_has_the_lowest_loss_gap():
    torch.manual_seed(3)
    model = BNNet()
    # relu2 is always ON (beta >> gamma): collapsing it changes nothing; relu1 is mixed
    set_bn(model.bn1, [0.5, -0.3, 0.0, 0.2, -1.0, 0.7])
    set_bn(model.bn2, [10.0] * 6, [3.0] * 6)
    with torch.no_grad():
        model.fc.weight.mul_(0.1)  # soft logits: the loss is far from saturated
    val = self_labelled(model)
    with torch.no_grad():
        m = model.eval()
        assert m.bn2(m.conv2(m.relu1(m.bn1(m.conv1(val.tensors[0]))))).min() > 0
    step = TLC(select="lowest").step(context(model, val, ["relu1", "relu2"]))
    want = {
        "relu1": independent_gap(model, "relu1", "bn1", "conv1", val),
        "relu2": independent_gap(model, "relu2", "bn2", "conv2", val),
    }
    assert step.scores == pytest.approx(want, abs=1e-6)
    assert want["relu2"] == 0.0 and want["relu1"] > 1e-3
    assert step.chosen == ["relu2"]
    assert step.info["tlc"]["sites"]["relu2"]["off"] == 0


def test_joint_rule_of_the_reference():
    gaps = {"a": 0.3, "b": -0.2, "c": -0.1, "d": 0.05}
    seen = []

    def additive(extra):
        def joint(sites):
            seen.append(list(sites))
            return sum(gaps[s] for s in sites) + extra * (len(sites) - 1)

        return joint

    # no k flips the joint gap positive: fall back to the single lowest
    assert select_joint(gaps, additive(0.0))[0] == ["b"]
    assert seen == [["b", "c"], ["b", "c", "d"]]  # k = 2 .. n-1
    # k = 2 gives -0.3 + 0.4 > 0: the first positive k is taken, the flipping site included
    chosen, tried = select_joint(gaps, additive(0.4))
    assert chosen == ["b", "c"] and tried == [{"k": 2, "gap": pytest.approx(0.1)}]
    # smallest gap >= 0: the single lowest, no joint trial
    seen.clear()
    assert select_joint({"a": 0.2, "b": 0.0}, additive(1.0)) == (["b"], [])
    assert seen == []
    # a budget caps the joint set: it stops growing at the limit and is taken as it is
    seen.clear()
    assert select_joint(gaps, additive(0.0), limit=2) == (
        ["b", "c"], [{"k": 2, "gap": pytest.approx(-0.3)}])
    assert seen == [["b", "c"]]
    assert select_joint(gaps, additive(0.0), limit=1) == (["b"], [])
    assert select_joint(gaps, additive(0.0), limit=0) == ([], [])


@pytest.mark.slow
def test_tlc_respects_max_removals(tmp_path):
    """The reference rule may collapse several sites at once; the run's budget still holds."""
    res = run(tmp_path / "r", max_removals=1)
    assert len(res.linearized) <= 1
    assert all(len(h["removed"]) <= 1 for h in res.history)


def test_without_bn_uses_pre_activation_statistics():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight.mul_(0.1)
        model.fc1.bias.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5, 0.05, -0.05]))
    g = torch.Generator().manual_seed(1)
    val = TensorDataset(torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g))
    before = copy.deepcopy(model.state_dict())
    method = TLC()
    step = method.step(context(model, val, ["relu1"]))
    with torch.no_grad():
        pre = model.fc1(val.tensors[0][:16])  # the first validation batch only
    mean, std = pre.mean(0), pre.std(0)
    off = mean <= 0
    assert 0 < int(off.sum()) < 6
    new = step.model
    assert torch.all(new.fc1.weight[off] == 0) and torch.all(new.fc1.bias[off] == 0)
    assert torch.equal(new.fc1.weight[~off], before["fc1.weight"][~off])
    rec = step.info["tlc"]["sites"]["relu1"]
    assert rec["source"] == "stats" and rec["producer"] == "fc1" and rec["off"] == int(off.sum())
    err = 0.5 * (1 + torch.erf(-mean.abs() / std / math.sqrt(2)))
    assert rec["error"] == pytest.approx(float(err.mean()), rel=1e-5)
    # collapsed = the masked first layer followed linearly by the second
    x = torch.randn(5, 8)
    with torch.no_grad():
        h = F.linear(x, before["fc1.weight"], before["fc1.bias"]) * (~off)
        torch.testing.assert_close(new(x), model.fc2(h))


def test_post_add_site_has_no_bn_and_masks_nothing():
    model = create("convnet", width=0.25, image_size=8)
    val = images(16, 0)
    val = TensorDataset(torch.randn(16, 3, 8, 8), val.tensors[1])
    plans = collapse_plans(model, ["relu1", "relu3"], [(val.tensors[0], val.tensors[1])])
    assert plans["relu1"].source == "bn" and plans["relu1"].bn == "bn1"
    assert plans["relu1"].producer == "conv1"
    assert plans["relu3"].source == "stats" and plans["relu3"].masks == {}


def test_options_are_checked():
    with pytest.raises(easier.ConfigError, match="select"):
        create_method("tlc", select="best")
    with pytest.raises(easier.ConfigError, match="batches"):
        create_method("tlc", batches=0)
    with pytest.raises(easier.ConfigError, match="bn_batches"):
        create_method("tlc", bn_batches=-1)
    assert create_method("tlc", batches=None).options() == {"batches": None, "select": "joint",
                                                            "bn_batches": 4}
    # without BN re-estimation the options are those recorded before it existed (runs resume)
    assert create_method("tlc", bn_batches=0).options() == {"batches": 1, "select": "joint"}


def test_loop_stops_at_the_first_drop(monkeypatch):
    seq = iter([90.0, 89.5, 88.0])
    monkeypatch.setattr(
        reduce_mod, "fine_tune", lambda *a, **k: TrainResult(epochs=1, loss=0.1, accuracy=50.0)
    )
    monkeypatch.setattr("easier.pipeline.scores.evaluate", lambda *a, **k: (0.5, next(seq)))
    res = reduce(BNNet(), images(32), images(16, 1), method="tlc",
                 finetune=FineTune(batch_size=16), stop=StopRule(delta=1.0))
    assert [h["accepted"] for h in res.history] == [True, True, False]
    assert res.linearized == res.history[1]["removed"] != []
    assert easier.linearized_sites(res.model) == res.linearized
    assert "88.00 < baseline 90.00" in res.stop_reason


def run(out, method="tlc", resume=False, max_removals=4):
    return tiny_run(out, method, resume=resume, max_removals=max_removals)


def rows(d):
    return history_rows(d)


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_result_folds(tmp_path, one_thread):
    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", method=crash_at(TLC, 2))
    assert len(rows(tmp_path / "cut")) == 2  # baseline + iteration 1 saved
    resumed = run(tmp_path / "cut", resume=True)
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    # a run stopped by a budget continues when resumed with the full one (a budget that does
    # not cut iteration 1's joint set, which a smaller one would: max_removals caps it)
    run(tmp_path / "short", max_removals=len(full.history[1]["removed"]))
    assert run(tmp_path / "short", resume=True).linearized == full.linearized
    assert rows(tmp_path / "short") == rows(tmp_path / "full")
    assert resumed.linearized == full.linearized and len(full.linearized) >= 3
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "full" / "state.pt", weights_only=True)["method_state"]
    sb = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["method_state"]
    assert sa["masks"].keys() == sb["masks"].keys() and sa["masks"]
    for name, mask in sa["masks"].items():  # the masks held through every fine-tune
        assert torch.equal(mask, sb["masks"][name]) and torch.all(a[name][mask] == 0)
    x = torch.randn(2, 3, 8, 8)
    folded = fold(full.model.eval(), x, plan="all")
    torch.testing.assert_close(folded(x), full.model(x), rtol=1e-4, atol=1e-5)
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) < 4  # linearized sites let convs merge


def test_candidates_are_scored_without_padding_relocation_and_the_chosen_one_relocated():
    """relu1 sits between bn1 and a padded conv2: relocating the padding moves bn1's shift into
    the border, a change of the function that is not the collapse's, so it stays out of the gap."""
    torch.manual_seed(3)
    model = BNNet()
    set_bn(model.bn1, [2.0, -0.3, 1.5, 1.0, -1.0, 2.0])
    val = self_labelled(model)
    x, y = val.tensors[0][:16], val.tensors[1][:16]
    step = TLC(select="lowest").step(context(model, val, ["relu1"], fold_ready=True))
    plain = independent_gap(model, "relu1", "bn1", "conv1", val)
    relocated = easier.linearize(masked_by_hand(model, "bn1", "conv1"), ["relu1"],
                                 example_input=x, fold_ready=True).eval()
    with torch.no_grad():
        moved = float(F.cross_entropy(relocated(x), y) - F.cross_entropy(model.eval()(x), y))
    assert abs(moved - plain) > 1e-3  # the border change is large enough to matter here
    assert step.scores["relu1"] == pytest.approx(plain, abs=1e-6)
    # the chosen site is relocated for folding, as the run asked (fold_ready=True)
    with torch.no_grad():
        torch.testing.assert_close(step.model.eval()(x), relocated(x))


# ---------------------------------------------------------------------------------------------
# models torch.fx cannot trace: a Hugging Face BERT, data-dependent control flow


def _hf_bert():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=24, vocab_size=60, num_labels=2)
    return T.BertForSequenceClassification(cfg).eval()


class _Tokens(torch.utils.data.Dataset):
    """Hugging Face style dict samples: input_ids and labels."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 60, (n, 6), generator=g)
        self.y = (self.ids[:, 0] > 30).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.y[i]}


def test_collapse_plans_on_a_hf_bert_match_hooked_statistics():
    m = _hf_bert()
    with pytest.raises(Exception):  # noqa: B017  (the point: fx fails on this model)
        torch.fx.symbolic_trace(m)
    data = _Tokens(8, 0)
    x = {"input_ids": data.ids}
    sites = [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in (0, 1)]
    plans = collapse_plans(m, sites, [(x, data.y)])
    # independent: the producing Linear's output, seen by a forward hook on the eager model
    seen = {}
    hooks = [m.get_submodule(f"bert.encoder.layer.{i}.intermediate.dense").register_forward_hook(
        lambda _m, _a, out, i=i: seen.__setitem__(i, out.detach())) for i in (0, 1)]
    with torch.no_grad():
        m(**x)
    for h in hooks:
        h.remove()
    for i, site in enumerate(sites):
        plan, z = plans[site], seen[i].reshape(-1, seen[i].shape[-1]).double()
        dense = f"bert.encoder.layer.{i}.intermediate.dense"
        assert plan.source == "stats" and plan.bn is None and plan.producer == dense
        torch.testing.assert_close(plan.beta.double(), z.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plan.gamma.double(), z.std(0), rtol=1e-4, atol=1e-6)
        assert set(plan.masks) == {f"{dense}.weight", f"{dense}.bias"}
        assert torch.equal(plan.masks[f"{dense}.weight"], z.mean(0) <= 0)


class _Pixels(torch.utils.data.Dataset):
    """Hugging Face style dict samples: pixel_values and labels."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = (self.x[:, 0].mean((1, 2)) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.mark.slow
def test_tlc_reduces_a_hf_resnet_end_to_end():
    T = pytest.importorskip("transformers")
    from transformers.models.resnet.modeling_resnet import ResNetConvLayer

    torch.manual_seed(0)
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic",
                         num_labels=2)
    m = T.ResNetForImageClassification(cfg)
    res = reduce(m, _Pixels(32, 0), _Pixels(16, 1), method=TLC(select="lowest"),
                 stop=easier.StopRule(delta=100.0, max_removals=1),
                 finetune=FineTune(batch_size=16, max_steps=2))
    assert len(res.linearized) == 1
    plans = res.history[1]["tlc"]["sites"]
    # from the module tree: a conv layer's ReLU has its own BN in front, a post-add one has none
    bns = {f"{n}.activation": f"{n}.normalization" for n, mod in m.named_modules()
           if isinstance(mod, ResNetConvLayer) and isinstance(mod.activation, nn.ReLU)}
    assert len(plans) == 3 and {s: p["bn"] for s, p in plans.items() if p["bn"]} == bns
    plan = plans[res.linearized[0]]
    for name in plan["masked"]:  # OFF channels stay exactly zero through fine-tuning
        p = res.model.get_parameter(name).detach()
        assert int((p.reshape(len(p), -1) == 0).all(1).sum()) == plan["off"], name


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.relu1, self.fc2 = nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu1(self.fc1(x))
        if h.mean() > 0:  # data-dependent: torch.export cannot capture it
            h = h * 2
        return self.fc2(h)


@pytest.mark.slow
def test_tlc_on_a_model_export_cannot_capture_says_why():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    with pytest.warns(easier.EasierWarning), pytest.raises(easier.TraceError, match="TLC finds"):
        reduce(_DataDependent(), data, data, method="tlc",
               stop=easier.StopRule(delta=100.0, max_removals=1),
                 finetune=FineTune(batch_size=16, max_steps=1))
