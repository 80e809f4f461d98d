"""EGP and NEPENTHE: site -> layer map, budget water-filling, masks, linearization, loop."""

import copy
import importlib
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import easier
from easier import ConfigError, RunConfig, StopRule, measure_entropy
from easier.methods import Context, create_method
from easier.methods.egp import Egp, site_layers, waterfill
from easier.methods.nepenthe import Nepenthe, nepenthe_logits
from easier.models import create
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune, TrainResult, fine_tune

reduce_mod = importlib.import_module("easier.pipeline.iteration")  # the loop body, to monkeypatch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: avoids OpenMP stalls on a busy 2-core machine, and module-scoped so the shared
    runs below compute with the same thread count (hence the same floats) as the tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Mlp(nn.Module):
    """fc1-bn1-relu1, fc2-relu2 (no BN), head: two sites, two prunable layers."""

    def __init__(self, d=6, h=12):
        super().__init__()
        self.fc1, self.bn1, self.relu1 = nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(h, h), nn.ReLU()
        self.head = nn.Linear(h, 3)

    def forward(self, x):
        return self.head(self.relu2(self.fc2(self.relu1(self.bn1(self.fc1(x))))))


class Tokens(nn.Module):
    """A site behind LayerNorm has no prunable layer."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.act = nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU()

    def forward(self, x):
        return self.act(self.ln(self.fc(x)))


def vectors(n=96, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1, :4].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def convnet():
    torch.manual_seed(0)
    return create("convnet", num_classes=3, in_channels=3, width=0.25, image_size=8)


def context(model, data, iteration=1, removed=()):
    sites = [s.name for s in easier.find_sites(model, data[:2][0])]
    return Context(
        model=model,
        remaining=[s for s in sites if s not in removed],
        removed=list(removed),
        k=1,
        iteration=iteration,
        rng=random.Random(0),
        train_eval=data,
        val=data,
        batch_size=32,
        example=data[:2][0],
    )


# ---------------------------------------------------------------------------------------------
# site -> layer map


def test_site_layers_walk_back_through_bn_to_the_residual_branch():
    resnet = create("resnet18", num_classes=10, in_channels=3, width=0.125, image_size=32)
    links = site_layers(resnet)
    assert len(links) == 17
    assert links["relu"].layer == "conv1" and links["relu"].norm == "bn1"
    assert links["layer1.0.relu1"].layer == "layer1.0.conv1" and links["layer1.0.relu1"].direct
    # post-add sites map to the branch conv, also when the shortcut is a 1x1 conv + BN
    for block in ("layer1.0", "layer2.0", "layer4.1"):
        link = links[f"{block}.relu2"]
        assert (link.layer, link.norm, link.direct) == (f"{block}.conv2", f"{block}.bn2", False)
    assert not any(link.layer.startswith(("fc", "layer2.0.downsample")) for link in links.values())
    assert site_layers(convnet())["relu3"].layer == "conv3"
    mlp = site_layers(Mlp(), example_input=torch.randn(2, 6))
    assert mlp["relu2"].layer == "fc2" and mlp["relu2"].norm is None and mlp["relu2"].direct
    assert site_layers(Tokens(), example_input=torch.randn(2, 4)) == {"act": None}


# ---------------------------------------------------------------------------------------------
# budget


def reference_allocation(scores, remaining, amount):
    """The reference's float water-filling (src/main.py), re-implemented as it behaves."""
    layers = list(range(len(scores)))
    total_s = sum(scores)
    to_prune = amount * sum(remaining)
    waiting, fix = list(layers), {}
    while True:
        changed = False
        head = {i: total_s / scores[i] for i in waiting}
        top = max(head.values())
        expo = {i: math.exp(head[i] - top) for i in waiting}
        z = sum(expo.values())
        for i in waiting:
            fix[i] = to_prune * expo[i] / z
        for i in list(waiting):
            if remaining[i] < fix[i]:
                fix[i] = remaining[i]
                to_prune -= remaining[i]
                total_s -= scores[i]
                waiting.remove(i)
                changed = True
        if not changed:
            return [fix[i] for i in layers]


def test_waterfill_by_hand_caps_recompute_and_round():
    # EGP, by hand: T=7, I=(7, 3.5, 1.75): layer 0 wants ~536 of B=555 > 10 -> capped;
    # T=6, I=(3, 1.5) over B=545: layer 1 wants ~445.6 > 100 -> capped; layer 2 takes 445.
    assert waterfill([1.0, 2.0, 4.0], [10, 100, 1000], 555) == [10, 100, 445]
    # equal scores: 11/3 each, largest remainder (ties to the earlier layer) makes the sum exact
    assert waterfill([1.0, 1.0, 1.0], [7, 7, 7], 11) == [4, 4, 3]
    # NEPENTHE, by hand: mean s = 7/3, logits log R + I give shares (.0466, .1449, .8085) of 555;
    # layer 0 wants ~25.9 > 10 -> capped; then mean s = 3: shares (.1747, .8253) of 545 =
    # (95.2, 449.8), rounded by largest remainder to (95, 450).
    assert waterfill([1.0, 2.0, 4.0], [10, 100, 1000], 555, nepenthe_logits) == [10, 95, 450]
    assert waterfill([1.0, 2.0], [5, 5], 0) == [0, 0]
    assert waterfill([0.0, 2.0, 1.0], [3, 5, 5], 4) == [3, 0, 1]  # s=0: infinite irrelevance
    with pytest.raises(ConfigError, match="outside"):
        waterfill([1.0], [3], 4)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.01, 10.0), st.integers(1, 400)), min_size=1, max_size=7),
    st.sampled_from([0.25, 0.5, 0.75, 1.0]),
)
def test_waterfill_sums_to_budget_within_caps_and_matches_reference(layers, rho):
    scores = [s for s, _ in layers]
    remaining = [4 * r for _, r in layers]  # rho * total is an integer
    budget = round(rho * sum(remaining))
    out = waterfill(scores, remaining, budget)
    assert sum(out) == budget
    assert all(0 <= n <= r for n, r in zip(out, remaining, strict=True))
    ref = reference_allocation(scores, remaining, rho)
    assert all(
        math.floor(f) - 1e-6 <= n <= math.ceil(f) + 1e-6 for n, f in zip(out, ref, strict=True)
    )
    ours = waterfill(scores, remaining, budget, nepenthe_logits)
    assert sum(ours) == budget and all(0 <= n <= r for n, r in zip(ours, remaining, strict=True))


# ---------------------------------------------------------------------------------------------
# one round


def pretrained_mlp():
    torch.manual_seed(0)
    model = Mlp()
    fine_tune(model, vectors(), FineTune(epochs=2, batch_size=32), seed=0)
    return model.eval()


@pytest.mark.parametrize("cls", [Egp, Nepenthe])
def test_round_prunes_the_allocated_smallest_weights(cls):
    data = vectors()
    model = pretrained_mlp()
    method = cls(rho=0.5)
    before = {n: model.get_parameter(f"{n}.weight").detach().clone() for n in ("fc1", "fc2")}
    rep = measure_entropy(model, [data.tensors[0]])
    assert rep["relu1"] > 0 and rep["relu2"] > 0
    step = method.step(context(model, data))
    assert step.chosen == []
    # independent recomputation of the allocation: s = H * mean|w|, budget = half of all weights
    scores = [
        rep[s] * float(before[n].abs().mean()) for s, n in (("relu1", "fc1"), ("relu2", "fc2"))
    ]
    counts = [before["fc1"].numel(), before["fc2"].numel()]
    expect = waterfill(scores, counts, round(0.5 * sum(counts)), method.logits)
    assert step.info["pruned_per_layer"] == {"fc1": expect[0], "fc2": expect[1]}
    assert sum(expect) == sum(counts) // 2
    for (name, w0), k in zip(before.items(), expect, strict=True):
        w1 = step.model.get_parameter(f"{name}.weight").detach()
        smallest = set(w0.abs().flatten().argsort()[:k].tolist())
        assert set((w1.flatten() == 0).nonzero().flatten().tolist()) == smallest
        kept = w1 != 0
        assert torch.equal(w1[kept], w0[kept])  # survivors untouched
    assert step.info["sparsity"] == pytest.approx(0.5)
    assert torch.count_nonzero(model.fc1.weight) == model.fc1.weight.numel()  # input untouched
    # second round: the budget is half of the *surviving* weights, only survivors are pruned
    second = method.step(context(step.model, data, iteration=2))
    left = sum(int((step.model.get_parameter(f"{n}.weight") != 0).sum()) for n in before)
    assert sum(second.info["pruned_per_layer"].values()) == math.floor(0.5 * left + 0.5)
    assert second.info["sparsity"] == pytest.approx(
        1 - (left - math.floor(0.5 * left + 0.5)) / sum(counts)
    )


def test_nepenthe_prunes_a_larger_fraction_of_low_entropy_layers():
    scores, remaining = [0.5, 1.0, 2.0, 4.0], [400, 400, 400, 400]
    out = waterfill(scores, remaining, 800, nepenthe_logits)
    assert out[0] > out[1] > out[2] > out[3] > 0  # graded, not one-hot
    # EGP: I = T/s = (15, 7.5, 3.75, 1.875) -> layer 0 capped; then T = 7, I = (7, 3.5, 1.75)
    # over B = 400: shares (.9657, .0292, .0051) -> (386.3, 11.7, 2.0) -> (386, 12, 2)
    assert waterfill(scores, remaining, 800) == [400, 386, 12, 2]  # nearly greedy
    flat = waterfill(scores, remaining, 800, lambda s, r: nepenthe_logits(s, r, tau=1e6))
    assert max(flat) - min(flat) <= 1  # tau -> inf: uniform layer-wise pruning


def test_masks_keep_pruned_weights_zero_through_fine_tuning():
    data = vectors()
    method = Egp(rho=0.5)
    model = method.step(context(pretrained_mlp(), data)).model
    pruned = {n: model.get_parameter(f"{n}.weight").detach() == 0 for n in ("fc1", "fc2")}
    start = {n: model.get_parameter(f"{n}.weight").detach().clone() for n in pruned}
    free = copy.deepcopy(model)
    cfg = FineTune(epochs=2, batch_size=16, lr=0.1)
    fine_tune(model, data, cfg, seed=1, after_step=method.after_step)
    fine_tune(free, data, cfg, seed=1)  # the same training without the masks
    for n, mask in pruned.items():
        w = model.get_parameter(f"{n}.weight").detach()
        assert torch.all(w[mask] == 0) and not torch.any(torch.signbit(w[mask]))
        assert not torch.equal(w[~mask], start[n][~mask])  # the survivors did train
        assert torch.count_nonzero(free.get_parameter(f"{n}.weight")[mask]) > 0
    # the masks survive a save/load through weights_only
    again = Egp()
    again.load_state_dict(torch.load(_save(method.state_dict()), weights_only=True))
    assert again.masks.keys() == method.masks.keys()
    assert all(torch.equal(again.masks[k], method.masks[k]) for k in method.masks)


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def gated_mlp():
    """relu1 at zero entropy: channels 0-5 always ON, 6-11 always OFF; relu2 not."""
    model = pretrained_mlp()
    with torch.no_grad():
        model.bn1.weight.fill_(0.5)
        model.bn1.bias.copy_(torch.tensor([4.0] * 6 + [-4.0] * 6))
    return model


@pytest.mark.parametrize("dead", ["zero", "identity"])
def test_zero_entropy_site_is_linearized_and_off_channels_zeroed(dead):
    data = vectors()
    model = gated_mlp()
    x = data.tensors[0]
    assert measure_entropy(model, [x])["relu1"] == 0.0
    step = Egp(dead=dead).step(context(model, data))
    assert step.chosen == ["relu1"] and step.scores["relu1"] == 0.0
    new = step.model.eval()
    assert easier.linearized_sites(new) == ["relu1"]
    assert [s.name for s in easier.find_sites(new, x)] == ["relu2"]
    assert set(step.info["pruned_per_layer"]) == {"fc2"}  # fc1 left the prunable set
    with torch.no_grad():
        was = model.relu1(model.bn1(model.fc1(x)))
        now = new.bn1(new.fc1(x))  # what relu2's layer now receives
    if dead == "zero":
        assert step.info["dead_channels_zeroed"] == 6
        assert torch.equal(now, was)  # exact: ON channels are identity, OFF ones are 0
    else:
        assert step.info["dead_channels_zeroed"] == 0
        assert torch.all(now[:, 6:] < 0) and torch.equal(now[:, :6], was[:, :6])


# ---------------------------------------------------------------------------------------------
# the loop


def scripted(monkeypatch, accuracies):
    seq = iter(accuracies)
    monkeypatch.setattr(
        reduce_mod,
        "fine_tune",
        lambda *a, **k: TrainResult(epochs=1, steps=1, loss=0.1, accuracy=50.0),
    )
    monkeypatch.setattr("easier.pipeline.scores.evaluate", lambda *a, **k: (0.5, next(seq)))


def test_loop_stops_at_first_drop_and_keeps_the_last_accepted_round(monkeypatch):
    scripted(monkeypatch, [90.0, 89.6, 89.2, 88.5, 95.0])  # floor 89.0
    res = reduce(gated_mlp(), vectors(), vectors(32, seed=1), method="egp",
                 stop=StopRule(delta=1.0))
    assert [h["accepted"] for h in res.history] == [True, True, True, False]
    assert "88.50 < baseline 90.00" in res.stop_reason
    assert res.history[1]["chosen"] == ["relu1"] and res.linearized == ["relu1"]
    # the returned model is round 2's: its zeros are round 2's sparsity of fc1+fc2
    w = [res.model.get_parameter(f"{n}.weight") for n in ("fc1", "fc2")]
    sparsity = sum(int((p == 0).sum()) for p in w) / sum(p.numel() for p in w)
    assert sparsity == pytest.approx(res.history[2]["sparsity"])
    assert res.history[3]["sparsity"] > res.history[2]["sparsity"]


def test_loop_stops_when_nothing_is_left_to_prune(monkeypatch):
    scripted(monkeypatch, [90.0] * 20)
    res = reduce(pretrained_mlp(), vectors(), vectors(32, seed=1), method=Egp(rho=1.0))
    # round 1 empties both layers; round 2 linearizes both now-constant sites, prunes nothing
    assert res.history[1]["sparsity"] == 1.0 and res.history[1]["chosen"] == []
    assert sorted(res.history[2]["chosen"]) == ["relu1", "relu2"]
    assert res.stop_reason == "no site left" and len(res.history) == 3
    # max_removals caps the zero-entropy sites taken in a round (earliest first)
    capped = reduce(pretrained_mlp(), vectors(), vectors(32, seed=1), method=Egp(rho=1.0),
                    stop=StopRule(max_removals=1))
    assert capped.history[2]["chosen"] == ["relu1"] and capped.linearized == ["relu1"]
    assert len(capped.history) == 3  # and nothing more happens after it


class Interrupted(Exception):
    pass


def dies_at(cls, at, **options):
    """An instance of ``cls`` (same name and options) that dies at the start of round ``at``."""

    class Dying(cls):
        def step(self, ctx):
            if ctx.iteration == at:
                raise Interrupted
            return super().step(ctx)

    return Dying(**options)


KW = {
    "stop": StopRule(delta=100.0, max_iterations=4),
    "run": RunConfig(seed=2),
    "finetune": FineTune(epochs=1, batch_size=32, lr=0.05),
}


@pytest.fixture(autouse=True, scope="module")
def _no_png():
    """The run directory's PNG report costs ~1 s per iteration and is not under test here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("easier.report.files"), "plot_history", lambda *a, **k:
        None)
        yield


@pytest.fixture(scope="module", params=[Egp, Nepenthe], ids=["egp", "nepenthe"])
def full_run(request, tmp_path_factory, _no_png):
    out = tmp_path_factory.mktemp(request.param.name) / "full"
    res = reduce(
        convnet(), images(96, 0), images(48, 1), method=request.param(rho=0.75), out=out, **KW
    )
    return request.param, res


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(full_run, tmp_path):
    cls, full = full_run
    out = tmp_path / "killed"
    with pytest.raises(Interrupted):
        reduce(
            convnet(), images(96, 0), images(48, 1), method=dies_at(cls, 3, rho=0.75), out=out, **KW
        )
    assert len((out / "history.jsonl").read_text().splitlines()) == 3  # rounds 0-2 saved
    res = reduce(
        convnet(), images(96, 0), images(48, 1), method=cls(rho=0.75), out=out, resume=True, **KW
    )

    def rows(d):
        out = [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]
        for r in out:
            r.pop("seconds")
        return out

    assert rows(out) == rows(full.out)
    a, b = full.model.state_dict(), res.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.history[-1]["sparsity"] > 0.9  # four rounds at rho=0.75 kept pruning


@pytest.mark.slow
def test_output_linearizes_and_folds(full_run):
    _, full = full_run
    assert full.linearized  # some layer reached zero entropy through pruning
    model = full.model.eval()
    x = images(4, 3).tensors[0]
    folded = easier.fold(model, x, plan="all")  # verifies against the model, raises otherwise
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    # the saved model rebuilds (base + recorded edits + state_dict) with the pruned zeros
    again = easier.load_model(full.out / "model.pt", convnet())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_nepenthe_runs_in_the_loop_and_options_are_checked():
    res = reduce(
        convnet(), images(64, 0), images(32, 1), method="nepenthe",
        **{**KW, "stop": StopRule(delta=100.0, max_iterations=2)},
    )
    assert [h["sparsity"] for h in res.history[1:]] == pytest.approx([0.5, 0.75], abs=2e-3)
    assert create_method("nepenthe", tau=2.0).options() == {"rho": 0.5, "tau": 2.0, "dead": "zero"}
    for bad in ({"rho": 0.0}, {"rho": 1.5}, {"dead": "const"}):
        with pytest.raises(ConfigError):
            create_method("egp", **bad)
    with pytest.raises(ConfigError, match="tau"):
        create_method("nepenthe", tau=0)
    with pytest.raises(ConfigError, match="nothing to prune"):
        Egp().step(context(Tokens(), TensorDataset(torch.randn(8, 4))))


# ---------------------------------------------------------------------------------------------
# models torch.fx cannot trace: a Hugging Face ResNet, data-dependent control flow


def _hf_resnet():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                         layer_type="basic", num_labels=2)
    return T.ResNetForImageClassification(cfg)


class _Pixels(torch.utils.data.Dataset):
    """Hugging Face style dict samples: pixel_values and labels."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = (self.x[:, 0].mean((1, 2)) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_site_layers_on_a_hf_resnet_that_fx_cannot_trace():
    from transformers.models.resnet import modeling_resnet as R

    m = _hf_resnet()
    with pytest.raises(Exception):  # noqa: B017  (the point: fx fails on this model)
        torch.fx.symbolic_trace(m)
    links = site_layers(m, example_input={"pixel_values": torch.randn(2, 3, 32, 32)})
    # expected from the module tree: a conv layer's ReLU reads its own BN(conv(x)); a basic
    # layer's ReLU reads the residual add, whose branch ends with the last conv layer
    expected = {}
    for name, mod in m.named_modules():
        if isinstance(mod, R.ResNetConvLayer) and isinstance(mod.activation, nn.ReLU):
            expected[f"{name}.activation"] = (f"{name}.convolution", f"{name}.normalization", True)
        if isinstance(mod, R.ResNetBasicLayer):
            last = f"{name}.layer.{len(mod.layer) - 1}"
            expected[f"{name}.activation"] = (f"{last}.convolution", f"{last}.normalization", False)
    assert len(expected) == 5
    assert {k: (v.layer, v.norm, v.direct) for k, v in links.items()} == expected


@pytest.mark.slow
def test_egp_prunes_a_hf_resnet_end_to_end():
    m = _hf_resnet()
    res = reduce(m, _Pixels(32, 0), _Pixels(16, 1), method="egp",
                 stop=easier.StopRule(delta=100.0, max_iterations=1),
                 finetune=FineTune(batch_size=16, max_steps=2))
    info = res.history[1]
    # every mapped conv weight is pruned by exactly what the round reported, to exact zeros
    convs = {n: mod for n, mod in res.model.named_modules() if isinstance(mod, nn.Conv2d)}
    left = {layer: int((convs[layer].weight != 0).sum()) for layer in info["weights_left"]}
    assert left == info["weights_left"]
    total = sum(convs[layer].weight.numel() for layer in left)
    assert info["sparsity"] == pytest.approx(1 - sum(left.values()) / total)
    assert info["budget"] > 0 and sum(info["pruned_per_layer"].values()) == info["budget"]


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1, self.head = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.act1(self.fc1(x))
        if h.mean() > 0:  # data-dependent: torch.export cannot capture it
            h = h * 2
        return self.head(h)


@pytest.mark.slow
def test_egp_on_a_model_export_cannot_capture_says_why():
    data = vectors(32)
    with pytest.warns(easier.EasierWarning), pytest.raises(easier.TraceError,
                                                           match="EGP maps each site"):
        reduce(_DataDependent(), data, data, method="egp",
               stop=easier.StopRule(delta=100.0, max_iterations=1),
                 finetune=FineTune(batch_size=16, max_steps=1))
