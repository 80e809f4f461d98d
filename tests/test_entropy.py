import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import easier
from easier import DataError, NonFiniteError, SiteError


def h2(p):
    """Binary entropy in bits, written independently of easier (plain math)."""
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def by_hand(z, axis=1, ge=False):
    """Per-channel (on, off) counts from nested Python loops over a tensor's elements."""
    z = z.movedim(axis, 1).reshape(z.shape[0], z.shape[axis], -1)
    on, off = [], []
    for c in range(z.shape[1]):
        vals = z[:, c, :].flatten().tolist()
        on.append(sum(v >= 0 if ge else v > 0 for v in vals))
        off.append(sum(v < 0 for v in vals))
    return on, off


class Act(nn.Module):
    """Identity producer, so the pre-activation is exactly the input."""

    def __init__(self, act=None):
        super().__init__()
        self.act = act or nn.ReLU()

    def forward(self, x):
        return self.act(x)


def test_entropy_of_hand_built_tensor_equals_by_hand():
    z = torch.randn(6, 3, 4, 4)
    z[:, 0] = z[:, 0].abs() + 0.1  # always on -> 0 bits
    z[:, 2, :2] = 0.0  # exact zeros are excluded
    rep = easier.measure_entropy(Act(), [z])
    on, off = by_hand(z)
    expect = [h2(o / (o + f)) for o, f in zip(on, off, strict=False)]
    nst = rep.neurons("act")
    assert nst.on.tolist() == on and nst.off.tolist() == off
    assert nst.zeros.tolist() == [0, 0, 6 * 2 * 4]
    assert nst.entropy.tolist() == pytest.approx(expect, abs=1e-12)
    assert rep["act"] == pytest.approx(sum(expect) / 3, abs=1e-12)
    assert expect[0] == 0.0


def test_whole_set_counts_over_batches_equal_one_big_batch():
    z = torch.randn(37, 5, 3, 3) + 0.3
    one = easier.measure_entropy(Act(), [z])
    many = easier.measure_entropy(Act(), list(z.split([4, 16, 1, 16])))
    assert torch.equal(one.neurons("act").on, many.neurons("act").on)
    assert torch.equal(one.neurons("act").off, many.neurons("act").off)
    assert one["act"] == many["act"]
    assert many.batches == 4 and many.samples == 37


def test_reference_estimator_equals_by_hand_per_batch_average():
    z = torch.randn(20, 4, 3, 3)
    z[:7] = z[:7].abs()
    batches = list(z.split(7))  # 7, 7, 6: uneven on purpose
    layer_vals = []
    for b in batches:
        on, _off = by_hand(b, ge=True)
        n = b.shape[0] * 9
        layer_vals.append(sum(h2(o / n) for o in on) / 4)
    rep = easier.measure_entropy(Act(), batches, estimator="reference")
    assert rep["act"] == pytest.approx(sum(layer_vals) / len(layer_vals), abs=1e-12)
    exact = easier.measure_entropy(Act(), batches)
    assert exact["act"] > rep["act"]  # per-batch averaging is biased low (entropy is concave)


def test_reference_estimator_counts_zero_as_on():
    z = torch.zeros(4, 2)
    assert easier.measure_entropy(Act(), [z], estimator="reference")["act"] == 0.0
    assert easier.measure_entropy(Act(), [z]).neurons("act").zeros.tolist() == [4, 4]


def test_shared_module_two_sites_different_statistics():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(x) + self.relu(-2 * x - 1)

    z = torch.randn(50, 3) + 0.5
    rep = easier.measure_entropy(M(), [z])
    on0, _ = by_hand(z)
    on1, _ = by_hand(-2 * z - 1)
    assert rep.neurons("relu").on.tolist() == on0
    assert rep.neurons("relu@1").on.tolist() == on1
    assert rep["relu"] != rep["relu@1"]


def test_inplace_activation_measured_on_pre_activation():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True))
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        on, off = by_hand(conv(x))
    rep = easier.measure_entropy(model, [x])
    assert rep.neurons("1").on.tolist() == on and rep.neurons("1").off.tolist() == off
    assert sum(off) > 0


def test_functional_inplace_chain():
    class M(nn.Module):
        def forward(self, x):
            y = F.relu(x - 0.5, inplace=True)
            return torch.relu_(y - 0.25)

    x = torch.rand(30, 4)
    rep = easier.measure_entropy(M(), [x])
    assert rep.neurons(":relu").on.tolist() == by_hand(x - 0.5)[0]
    assert rep.neurons(":relu@1").on.tolist() == by_hand(F.relu(x - 0.5) - 0.25)[0]


def test_token_tensor_pools_tokens_per_channel():
    fc = nn.Linear(4, 6)
    model = nn.Sequential(fc, nn.GELU())
    x = torch.randn(3, 7, 4)
    with torch.no_grad():
        on, _off = by_hand(fc(x), axis=-1)
    rep = easier.measure_entropy(model, [x])
    assert rep.neurons("1").on.tolist() == on and len(on) == 6


def test_element_neurons_and_axis_override():
    z = torch.randn(9, 2, 3)
    el = easier.measure_entropy(Act(), [z], neuron="element")
    assert el.neurons("act").on.tolist() == (z > 0).sum(0).flatten().tolist()
    last = easier.measure_entropy(Act(), [z], channel_axis={"act": 2})
    assert last.neurons("act").on.tolist() == by_hand(z, axis=2)[0]
    with pytest.raises(SiteError, match="batch axis"):
        easier.measure_entropy(Act(), [z], channel_axis=0)


def test_runs_in_eval_mode_and_restores_modes():
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.9), nn.BatchNorm1d(8), nn.ReLU())
    model[2].running_mean.fill_(0.3)
    model.train()
    x = torch.randn(64, 3)
    with torch.no_grad():
        z = model[2].eval()(model[0](x))  # eval: dropout off, running statistics
    model.train()
    rep = easier.measure_entropy(model, [x])
    assert rep.neurons("3").on.tolist() == by_hand(z)[0]
    assert model.training and all(m.training for m in model.modules())
    assert torch.allclose(model[2].running_mean, torch.full((8,), 0.3))  # stats not updated


def test_batch_formats_and_bad_input():
    z = torch.randn(8, 3)
    ref = easier.measure_entropy(Act(), [z])["act"]
    assert easier.measure_entropy(Act(), [(z, torch.zeros(8))])["act"] == ref
    assert easier.measure_entropy(Act(), [[z, 0]])["act"] == ref
    assert easier.measure_entropy(Act(), [{"img": z}], input_key="img")["act"] == ref
    # a dict batch without input_key is a Hugging Face-style batch: its keys are keyword args
    class KwAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, img):
            return self.act(img)

    assert easier.measure_entropy(KwAct(), [{"img": z, "labels": torch.zeros(8)}])["act"] == ref
    with pytest.raises(DataError, match="input_key"):
        easier.measure_entropy(Act(), [{"img": z}], input_key=["pixels"])
    with pytest.raises(DataError, match="empty"):
        easier.measure_entropy(Act(), [])
    with pytest.raises(SiteError, match="valid sites"):
        easier.measure_entropy(Act(), [z], sites=["nope"])


def test_nan_names_the_site():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU())
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="site '3'"):
        easier.measure_entropy(model, [torch.randn(4, 3)])


def test_report_roundtrip_ranking_and_table():
    z = torch.randn(10, 3)
    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.acts = nn.ModuleList([Act(), Act(nn.ReLU6()), Act(nn.GELU())])

        def forward(self, x):
            return sum(a(x) for a in self.acts)

    model = Three()
    rep = easier.measure_entropy(model, [z, z.abs()])
    again = easier.EntropyReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert again == rep and again.as_dict() == rep.as_dict()
    assert torch.equal(again.neurons("acts.1.act").on, rep.neurons("acts.1.act").on)
    # the three sites see the same pre-activation sign pattern -> equal entropy; ties by order
    assert rep.ranking() == ["acts.0.act", "acts.1.act", "acts.2.act"]
    assert rep.ranking(exclude=["acts.0.act"]) == ["acts.1.act", "acts.2.act"]
    text = str(rep)
    assert "acts.0.act" in text and "ReLU6" in text and f"{rep['acts.2.act']:.4f}" in text
    ref = easier.measure_entropy(model, [z], estimator="reference")
    assert easier.EntropyReport.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


def test_hook_fallback_measures_unshared_modules():
    class U(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ReLU()

        def forward(self, x):
            if x.sum() > 1e9:
                return x
            return self.a(x)

    z = torch.randn(12, 4)
    with pytest.warns(easier.EasierWarning):
        rep = easier.measure_entropy(U(), [z])
    assert rep.neurons("a").on.tolist() == by_hand(z)[0]


def test_inf_and_nan_are_caught_unless_check_is_off():
    z = torch.randn(6, 3)
    for bad in (float("inf"), float("-inf"), float("nan")):
        z[2, 1] = bad
        with pytest.raises(NonFiniteError, match="site 'act'"):
            easier.measure_entropy(Act(), [z])
    nst = easier.measure_entropy(Act(), [z], check_finite=False).neurons("act")
    assert nst.zeros.tolist() == [0, 1, 0]  # the NaN is excluded like a zero


@pytest.mark.parametrize("shape,axis", [((9, 5, 2, 3), 1), ((7, 3, 12, 12), 1),
                                        ((6, 4, 5), -1), ((11, 6), 1), ((5, 2, 8, 9), 2)])
def test_counts_equal_brute_force_over_layouts_and_chunks(monkeypatch, shape, axis):
    """Both reduction orders (few / many positions), channel-last tokens, a moved axis, exact
    zeros, and batches split into several chunks: counts equal a comparison loop."""
    from easier.entropy import counters
    from easier.graph.sites import Site

    monkeypatch.setattr(counters, "_CHUNK", 50)  # several chunks per batch
    torch.manual_seed(0)
    counter = counters.SiteCounter(Site("s", "relu", "module", "s", 0), "channel", axis, "exact")
    zs = [torch.randn(shape).round(decimals=1) for _ in range(2)]  # ~4% exact zeros
    for z in zs:
        counter(z)
    z = torch.cat(zs).movedim(axis, -1).reshape(-1, shape[axis])
    on = [sum(1 for v in z[:, c].tolist() if v > 0) for c in range(z.shape[1])]
    off = [sum(1 for v in z[:, c].tolist() if v < 0) for c in range(z.shape[1])]
    assert counter.on.tolist() == on and counter.off.tolist() == off
    assert counter.seen.tolist() == [z.shape[0]] * z.shape[1]
    assert int(counter.bad) == 0 and (z == 0).any()


class _ReadsTwice(nn.Module):
    """relu(z) + z: the pre-activation is read after the activation, so it must not be
    overwritten in place."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 4)
        self.act2 = nn.ReLU6()

    def forward(self, x):
        z = self.fc(x)
        return self.act2(self.fc2(self.act(z) + z))


def test_inplace_sites_only_where_nothing_else_reads_the_pre_activation():
    from easier.entropy.counters import inplace_sites
    from easier.entropy.estimate import EntropyPass
    from easier.graph.capture import capture
    from easier.graph.sites import graph_sites

    torch.manual_seed(0)
    model = _ReadsTwice().eval()
    x = torch.randn(64, 6)
    cap = capture(model, x)
    assert inplace_sites(cap.gm, graph_sites(model, cap, easier.graph.sites.KINDS)) == 1
    with torch.no_grad():
        assert torch.equal(cap.gm(x), model(x))
    counted = EntropyPass(model, x)
    with torch.no_grad():
        out = counted.runner(x)
    assert torch.equal(out, model(x))  # the instrumented, in-place graph computes the same
    counted.run([x])
    rep = counted.report()
    with torch.no_grad():  # brute force, independent of easier: the pre-activations themselves
        z1 = model.fc(x)
        z2 = model.fc2(torch.relu(z1) + z1)
    for name, z in (("act", z1), ("act2", z2)):
        st = rep.neurons(name)
        assert st.on.tolist() == (z > 0).sum(0).mul(2).tolist()  # two passes over x
        assert st.off.tolist() == (z < 0).sum(0).mul(2).tolist()
