import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import easier
from easier import SiteError


class Block(nn.Module):
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
        return self.act(F.relu(y - 0.1))


def positive_block():
    """Weights, biases and inputs all positive, so every pre-activation is > 0."""
    m = Block().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.abs() + 0.2)
    return m


def test_identity_where_activation_was_identity_and_differs_otherwise():
    m = positive_block()
    x = torch.rand(2, 3, 6, 6) + 0.5
    lin = easier.linearize(m, ["relu", "relu@1", "act"])
    torch.testing.assert_close(lin(x), m(x), rtol=0, atol=0)
    xn = torch.randn(2, 3, 6, 6)  # negative pre-activations now: removing ReLUs matters
    assert not torch.allclose(lin(xn), m(xn))


def test_original_untouched_and_state_dict_loads_across():
    m = Block().eval()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 5, 5)
    out = m(x)
    lin = easier.linearize(m, ["relu@1", ":relu", "act"])
    assert isinstance(m, Block) and not hasattr(m, "easier_linearized")
    assert [s.name for s in easier.find_sites(m)] == ["relu", "relu@1", ":relu", "act"]
    torch.testing.assert_close(m(x), out)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert set(lin.state_dict()) == set(m.state_dict())  # PReLU weight kept although unused
    lin.load_state_dict(m.state_dict(), strict=True)
    m2 = Block()
    m2.load_state_dict(lin.state_dict(), strict=True)
    assert easier.linearized_sites(lin) == ["relu@1", ":relu", "act"]
    assert lin.training is False


def test_linearized_model_trains():
    lin = easier.linearize(Block().train(), ["relu"])
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    w0 = lin.conv1.weight.detach().clone()
    loss = lin(torch.randn(4, 3, 5, 5)).pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(w0, lin.conv1.weight)


def test_names_survive_iterative_linearization():
    m = Block()
    once = easier.linearize(m, ["relu"])
    assert [s.name for s in easier.find_sites(once)] == ["relu@1", ":relu", "act"]
    twice = easier.linearize(once, ["relu@1"])
    assert easier.linearized_sites(twice) == ["relu", "relu@1"]
    x = torch.randn(2, 3, 5, 5)
    at_once = easier.linearize(m, ["relu", "relu@1"])
    torch.testing.assert_close(twice(x), at_once(x))


def test_bad_names():
    m = Block()
    with pytest.raises(SiteError, match=r"valid sites: \['relu', 'relu@1', ':relu', 'act'\]"):
        easier.linearize(m, ["relu2"])
    once = easier.linearize(m, ["relu"])
    with pytest.raises(SiteError, match="already linearized"):
        easier.linearize(once, ["relu"])
    with pytest.raises(SiteError, match="more than once"):
        easier.linearize(m, ["act", "act"])


def test_untraceable_model_swaps_modules():
    class U(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ReLU()
            self.b = nn.ReLU()

        def forward(self, x):
            if x.sum() > 1e9:
                return x
            return self.b(self.a(x) - 1)

    m = U()
    lin = easier.linearize(m, ["a"])
    assert isinstance(lin, U) and isinstance(lin.a, nn.Identity) and isinstance(m.a, nn.ReLU)
    x = torch.randn(5, 3)
    torch.testing.assert_close(lin(x), F.relu(x - 1))
