import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import easier
from easier import EasierWarning, NoSitesError, SiteError
from easier.errors import ConfigError


class SharedRelu(nn.Module):
    """torchvision BasicBlock style: one ReLU module called twice, plus a residual add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        return self.relu(self.conv2(y) + x)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        a = F.relu(x)
        b = F.relu(x, inplace=True)
        c = torch.relu(self.lin(a))
        d = c.relu_()
        e = torch.relu_(b + d)
        return e.relu()


class AllKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(), nn.PReLU(), nn.GELU(),
                                   nn.SiLU()])
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        for a in self.acts:
            x = a(x)
        x = F.relu6(F.leaky_relu(F.gelu(F.silu(F.prelu(x, self.w)))))
        return x


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):  # (B, T, C)
        return x + self.fc2(self.act(self.fc1(x)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ReLU()
        self.b = nn.ReLU()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture this
            x = -x
        x = self.b(self.b(x))
        return F.relu(self.a(self.conv(x)))


def test_shared_module_is_two_sites_with_readable_names():
    sites = easier.find_sites(SharedRelu(), torch.randn(2, 3, 5, 5))
    assert [s.name for s in sites] == ["relu", "relu@1"]
    assert [s.index for s in sites] == [0, 1]
    assert all(s.form == "module" and s.inplace and s.channel_axis == 1 for s in sites)
    assert all(s.kind == "ReLU" and s.target == "relu" for s in sites)
    assert sites[0].producer == "conv2d"  # the aten op, not the module class
    assert sites[1].producer == "conv2d"  # conv2(y) + x: walks back through the add
    assert sites[0].node != sites[1].node


def test_site_shape_is_the_pre_activation_shape_on_the_example_input():
    x = torch.randn(2, 3, 5, 5)
    sites = easier.find_sites(SharedRelu(), x)
    assert [s.shape for s in sites] == [(2, 3, 5, 5), (2, 3, 5, 5)]
    (site,) = easier.find_sites(Tokens(), torch.randn(2, 5, 8))
    assert site.shape == (2, 5, 16)


def test_site_shape_with_a_batch_of_one():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 9, 5), nn.GELU())
    sites = easier.find_sites(m, torch.randn(1, 3, 5, 5))
    assert [(s.name, s.kind, s.channel_axis, s.producer) for s in sites] == [
        ("2", "ReLU", 1, "batch_norm"), ("5", "GELU", -1, "linear")]
    assert [s.shape for s in sites] == [(1, 4, 3, 3), (1, 5)]
    assert easier.Site.from_dict(sites[0].to_dict()) == sites[0]


def test_functional_method_and_inplace_forms():
    sites = easier.find_sites(Functional(), torch.randn(2, 4))
    assert [s.name for s in sites] == [":relu", ":relu@1", ":relu@2", ":relu@3", ":relu@4",
                                       ":relu@5"]
    assert [s.form for s in sites] == ["function"] * 6  # x.relu() is a function site too
    assert {s.target for s in sites} == {":relu"}
    assert [s.inplace for s in sites] == [False, True, False, True, True, False]
    # F.relu(x) of the input has no producer; torch.relu(self.lin(a)) and what follows do
    assert [s.producer for s in sites] == [None, None, "linear", "linear", "linear", "linear"]
    assert [s.channel_axis for s in sites[2:]] == [-1] * 4


def test_functional_site_named_after_enclosing_module():
    model = nn.Sequential(nn.Linear(4, 4), Functional())
    names = [s.name for s in easier.find_sites(model, torch.randn(2, 4))]
    assert names == ["1:relu"] + [f"1:relu@{i}" for i in range(1, 6)]


def test_find_sites_needs_an_example_input():
    with pytest.raises(ConfigError, match="example input"):
        easier.find_sites(SharedRelu())


def test_every_kind_module_and_functional():
    x = torch.randn(2, 3)
    sites = easier.find_sites(AllKinds(), x)
    kinds = [s.kind for s in sites]
    assert kinds == ["ReLU", "ReLU6", "LeakyReLU", "PReLU", "GELU", "SiLU",
                     "PReLU", "SiLU", "GELU", "LeakyReLU", "ReLU6"]
    assert [s.name for s in sites[6:]] == [":prelu", ":silu", ":gelu", ":leaky_relu", ":relu6"]
    assert [s.form for s in sites] == ["module"] * 6 + ["function"] * 5
    only = easier.find_sites(AllKinds(), x, kinds=["GELU"])
    assert [s.name for s in only] == ["acts.4", ":gelu"]
    with pytest.raises(SiteError, match="valid kinds"):
        easier.find_sites(AllKinds(), x, kinds=["Tanh"])


def test_token_model_channel_is_last_axis():
    (site,) = easier.find_sites(Tokens(), torch.randn(2, 5, 8))
    assert site.name == "act" and site.kind == "GELU"
    assert site.channel_axis == -1 and site.producer == "linear"


def test_no_rectifier_is_a_clear_error():
    with pytest.raises(NoSitesError, match=r"ReLU.*GELU"):
        easier.find_sites(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), torch.randn(3, 2))


def test_untraceable_model_falls_back_to_hooks_and_names_lost_sites():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sites = easier.find_sites(Untraceable(), torch.randn(1, 2, 3, 3))
    assert [s.name for s in sites] == ["a"]  # b is shared (lost); F.relu is invisible
    assert sites[0].form == "hook" and sites[0].kind == "ReLU"
    assert sites[0].shape == (1, 2, 3, 3) and sites[0].channel_axis == 1
    msg = " ".join(str(w.message) for w in rec if issubclass(w.category, EasierWarning))
    assert "torch.export could not capture Untraceable" in msg
    assert "b (called 2x)" in msg and "functional" in msg


def test_untraceable_without_fallback_raises_trace_error():
    with pytest.raises(easier.TraceError, match="Untraceable"):
        easier.find_sites(Untraceable(), torch.randn(1, 2, 3, 3), fallback=False)
