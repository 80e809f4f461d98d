import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import easier
from easier import EasierWarning, SiteError
from easier.edit.linearize import CallSwitch, Linearized, apply_edits, edits_of
from easier.errors import ConfigError

X = torch.randn(2, 3, 5, 5)  # example input for captures


class Block(nn.Module):
    """Sites in order: relu, relu@1 (one module called twice), :relu (functional), act."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)  # called twice
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.PReLU()

    def forward(self, x):
        y = self.relu(self.bn(self.conv1(x)))
        y = self.relu(self.conv2(y) + x)
        return self.act(F.relu(y - 0.1)) + y  # "+ y": relu@1 is not redundant with :relu


def reference(m: Block, x: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """Block's forward by hand, with the sites numbered in ``skip`` (0..3) left out."""

    def act(i, fn, t):
        return t if i in skip else fn(t)

    y = act(0, torch.relu, m.bn(m.conv1(x)))
    y = act(1, torch.relu, m.conv2(y) + x)
    return act(3, m.act, act(2, torch.relu, y - 0.1)) + y


def positive_block():
    """Weights, biases and inputs all positive, so every pre-activation is > 0."""
    m = Block().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.abs() + 0.2)
    return m


def names(model, x=X):
    return [s.name for s in easier.find_sites(model, x)]


def test_identity_where_activation_was_identity_and_differs_otherwise():
    m = positive_block()
    x = torch.rand(2, 3, 6, 6) + 0.5
    lin = easier.linearize(m, ["relu", "relu@1", "act"], example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), m(x), rtol=0, atol=0)
        xn = torch.randn(2, 3, 6, 6)  # negative pre-activations now: removing ReLUs matters
        assert not torch.allclose(lin(xn), m(xn))
        torch.testing.assert_close(lin(xn), reference(m, xn, {0, 1, 3}))


@pytest.mark.parametrize("sites", [["relu"], ["relu@1"], [":relu"], ["act"],
                                   ["relu", ":relu"], ["relu@1", "act"]])
def test_each_site_matches_a_hand_written_forward(sites):
    m = Block().eval()
    index = {"relu": 0, "relu@1": 1, ":relu": 2, "act": 3}
    lin = easier.linearize(m, sites, example_input=X)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), reference(m, x, {index[s] for s in sites}))
        # again: call counters restart at every forward
        torch.testing.assert_close(lin(x), reference(m, x, {index[s] for s in sites}))
        if sites != ["act"]:  # alone, act sees F.relu's output (>= 0): PReLU is the identity
            assert not torch.allclose(lin(x), m(x))
    assert names(lin) == [n for n in index if n not in sites]


def test_original_untouched_and_state_dict_loads_across():
    m = Block().eval()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 5, 5)
    out = m(x)
    lin = easier.linearize(m, ["relu@1", ":relu", "act"], example_input=x)
    assert type(lin) is Block and not isinstance(lin, torch.fx.GraphModule)
    assert isinstance(m, Block) and not hasattr(m, "easier_edits")
    assert isinstance(m.relu, nn.ReLU) and isinstance(m.act, nn.PReLU)
    assert names(m, x) == ["relu", "relu@1", ":relu", "act"]
    torch.testing.assert_close(m(x), out)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    # the shared relu is switched per call; the PReLU keeps its weight although unused
    assert isinstance(lin.relu, CallSwitch) and lin.relu.calls == {1}
    assert isinstance(lin.act, Linearized) and lin.act.easier_kind == "PReLU"
    assert lin.act.weight is not m.act.weight and torch.equal(lin.act.weight, m.act.weight)
    assert list(lin.state_dict()) == list(m.state_dict())
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.5)
    m2 = Block().eval()
    m2.load_state_dict(lin.state_dict(), strict=True)  # linearized -> original
    assert torch.equal(m2.act.weight, m.act.weight + 0.5)
    lin.load_state_dict(m.state_dict(), strict=True)  # original -> linearized
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])
    assert easier.linearized_sites(lin) == ["relu@1", ":relu", "act"]
    assert lin.training is False
    with torch.no_grad():
        torch.testing.assert_close(lin(x), reference(m, x, {1, 2, 3}))


def test_edits_replay_on_a_fresh_model():
    m = Block().eval()
    lin = easier.linearize(m, ["relu@1", ":relu"], example_input=X)
    lin = easier.linearize(lin, ["act"], example_input=X)
    edits = edits_of(lin)
    assert [e["sites"] for e in edits] == [["relu@1", ":relu"], ["act"]]
    assert edits[0]["shared"] == ["relu"] and edits[0]["padding"] == {}
    rebuilt = apply_edits(Block(), edits).eval()
    rebuilt.load_state_dict(lin.state_dict(), strict=True)
    assert easier.linearized_sites(rebuilt) == ["relu@1", ":relu", "act"]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), lin(x), rtol=0, atol=0)
        torch.testing.assert_close(rebuilt(x), reference(m, x, {1, 2, 3}))


def test_linearized_model_trains():
    lin = easier.linearize(Block().train(), ["relu", ":relu"], example_input=X)
    assert lin.training
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    w0 = lin.conv1.weight.detach().clone()
    bn0 = lin.bn.running_mean.clone()
    loss = lin(torch.randn(4, 3, 5, 5)).pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(w0, lin.conv1.weight)
    assert not torch.equal(bn0, lin.bn.running_mean)  # BN still updates its statistics


def test_names_survive_iterative_linearization():
    m = Block().eval()
    x = torch.randn(2, 3, 5, 5)
    once = easier.linearize(m, ["relu"], example_input=X)
    assert names(once) == ["relu@1", ":relu", "act"]
    twice = easier.linearize(once, ["relu@1"], example_input=X)
    assert easier.linearized_sites(twice) == ["relu", "relu@1"]
    assert names(twice) == [":relu", "act"]
    at_once = easier.linearize(m, ["relu", "relu@1"], example_input=X)
    with torch.no_grad():
        torch.testing.assert_close(twice(x), at_once(x))
        torch.testing.assert_close(twice(x), reference(m, x, {0, 1}))
    # functional site first: the module sites keep their names
    f1 = easier.linearize(m, [":relu"], example_input=X)
    assert names(f1) == ["relu", "relu@1", "act"]
    f2 = easier.linearize(f1, ["relu@1"], example_input=X)
    assert names(f2) == ["relu", "act"]
    with torch.no_grad():
        torch.testing.assert_close(f2(x), reference(m, x, {1, 2}))


def test_names_survive_for_numbered_functional_sites():
    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(F.relu(self.fc(F.relu(x) - 0.5)) - 0.5))

    m = Three().eval()
    x = torch.randn(3, 4)
    assert names(m, x) == [":relu", ":relu@1", ":relu@2"]
    a = easier.linearize(m, [":relu@1"], example_input=x)
    assert names(a, x) == [":relu", ":relu@2"]
    b = easier.linearize(a, [":relu"], example_input=x)
    assert names(b, x) == [":relu@2"]
    with torch.no_grad():
        torch.testing.assert_close(b(x), F.relu(m.fc(m.fc(x - 0.5) - 0.5)))


def test_first_call_of_shared_module_without_example_input():
    m = Block().eval()
    lin = easier.linearize(m, ["relu"])
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), reference(m, x, {0}))
    assert names(lin) == ["relu@1", ":relu", "act"]


def test_without_example_input_names_are_checked_structurally():
    m = Block().eval()
    lin = easier.linearize(m, ["relu@1", ":relu", "act"])  # no capture needed
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), reference(m, x, {1, 2, 3}))
    with pytest.raises(SiteError, match="the model has no module 'relu2'"):
        easier.linearize(m, ["relu2"])
    with pytest.raises(SiteError, match="is not an activation module"):
        easier.linearize(m, ["conv1"])


def test_bad_names():
    m = Block()
    with pytest.raises(SiteError, match=r"valid sites: \['relu', 'relu@1', ':relu', 'act'\]"):
        easier.linearize(m, ["relu2"], example_input=X)
    with pytest.raises(SiteError, match=r"valid sites"):
        easier.linearize(m, [":relu@1"], example_input=X)  # only one functional relu
    once = easier.linearize(m, ["relu"], example_input=X)
    with pytest.raises(SiteError, match="already linearized"):
        easier.linearize(once, ["relu"], example_input=X)
    with pytest.raises(SiteError, match="already linearized"):
        easier.linearize(once, ["relu"])
    with pytest.raises(SiteError, match="more than once"):
        easier.linearize(m, ["act", "act"])
    with pytest.raises(ConfigError, match="example_input"):
        easier.linearize(m, ["act"], fold_ready=True)


def test_fold_ready_records_relocated_padding_and_keeps_shapes():
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 2, 5, padding=2), nn.ReLU(),
    ).eval()
    x = torch.randn(2, 3, 9, 9)
    lin = easier.linearize(m, ["2", "4"], example_input=x, fold_ready=True)
    (edit,) = edits_of(lin)
    # P = p1 + s1·p2 + s1·s2·p3 = 1 + 1 + 2·2
    assert edit["fold_ready"] and edit["padding"] == {"0": [6, 6], "3": [0, 0], "5": [0, 0]}
    assert [lin[i].padding for i in (0, 3, 5)] == [(6, 6), (0, 0), (0, 0)]
    assert [m[i].padding for i in (0, 3, 5)] == [(1, 1), (1, 1), (2, 2)]  # original untouched
    with torch.no_grad():
        assert lin(x).shape == m(x).shape
        rebuilt = apply_edits(copy.deepcopy(m), edits_of(lin)).eval()
        torch.testing.assert_close(rebuilt(x), lin(x), rtol=0, atol=0)
    # a site between two convs that stays keeps the chains apart: nothing to relocate for "6"
    only_last = easier.linearize(m, ["6"], example_input=x, fold_ready=True)
    assert edits_of(only_last)[0]["padding"] == {}


class U(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ReLU()
        self.b = nn.ReLU()

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.export cannot capture it
            return x
        return self.b(self.a(x) - 1)


def test_untraceable_model_swaps_modules():
    m = U()
    x = torch.randn(5, 3)
    with pytest.warns(EasierWarning, match="could not capture U"):
        assert [s.name for s in easier.find_sites(m, x)] == ["a", "b"]
    # without an example input a's call count is unknown: a CallSwitch turns off call 0 only
    for lin, switch in ((easier.linearize(m, ["a"]), CallSwitch),
                        (easier.linearize(m, ["a"], example_input=x), Linearized)):
        assert isinstance(lin, U) and type(lin.a) is switch and isinstance(m.a, nn.ReLU)
        assert isinstance(lin.b, nn.ReLU)
        torch.testing.assert_close(lin(x), F.relu(x - 1))
        torch.testing.assert_close(m(x), F.relu(F.relu(x) - 1))
    with pytest.raises(SiteError, match="no module 'c'"):
        easier.linearize(m, ["c"], example_input=x)


def test_untraceable_linearized_site_is_gone_from_the_sites():
    m = U()
    x = torch.randn(5, 3)
    lin = easier.linearize(m, ["a"], example_input=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EasierWarning)
        assert [s.name for s in easier.find_sites(lin, x)] == ["b"]


def test_shared_module_with_parameters_keeps_state_dict_names():
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.PReLU()

        def forward(self, x):
            return self.act(self.fc(self.act(x)))

    m = S().eval()
    x = torch.randn(4, 3)
    lin = easier.linearize(m, ["act@1"], example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), m.fc(m.act(x)))
    assert list(lin.state_dict()) == list(m.state_dict())
    S().load_state_dict(lin.state_dict(), strict=True)


def test_untraceable_shared_module_is_switched_per_call_and_converts_dtype():
    """Export cannot capture UShared, so its calls are counted with hooks on the example run."""

    class UShared(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.PReLU(init=0.1)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: torch.export cannot capture it
                return x
            return self.act(self.act(x) - 1)

    m = UShared().eval()
    x = torch.randn(5, 3)
    lin = easier.linearize(m, ["act"], example_input=x)
    assert isinstance(lin.act, CallSwitch) and lin.act.calls == {0}
    with torch.no_grad():
        w = m.act.weight
        torch.testing.assert_close(lin(x), torch.where(x - 1 > 0, x - 1, w * (x - 1)))
        # parameters converted on the switch reach the wrapped module (float64 forward)
        lin64, x64 = lin.double(), x.double()
        expect = torch.where(x64 - 1 > 0, x64 - 1, w.double() * (x64 - 1))
        torch.testing.assert_close(lin64(x64), expect, rtol=1e-12, atol=1e-12)
    assert list(lin.state_dict()) == list(m.state_dict()) == ["act.weight"]
