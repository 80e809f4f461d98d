"""Affine linearization: the least-squares a*z+b per channel, its edit record, and its fold."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _harness import rand_bn
from easier.edit.affine import fit_affine
from easier.edit.linearize import edits_of, linearize
from easier.errors import ConfigError
from easier.io.records import load_model, save_model
from easier.merge import fold
from easier.pipeline.settings import EntropyConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), rand_bn(6), nn.ReLU(),
                      nn.Conv2d(6, 5, 3, padding=1), rand_bn(5), nn.ReLU(),
                      nn.Conv2d(5, 4, 1))
    return m.to(dtype).eval()


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 8), nn.GELU(),
                         nn.Linear(8, 3)).to(dtype).eval()


def pre_activations(model: nn.Module, path: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """The inputs of module ``path`` over ``batches``, concatenated (by a forward hook)."""
    seen: list[torch.Tensor] = []
    h = model.get_submodule(path).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for x in batches:
            model(x)
    h.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("net,path,act", [(conv_net, "2", F.relu), (mlp, "1", F.relu),
                                          (mlp, "3", F.gelu)])
def test_fit_equals_numpy_least_squares(net, path, act):
    model = net()
    shape = (3, 8, 8) if net is conv_net else (7,)
    batches = [torch.randn(5, *shape) for _ in range(3)]
    fit = fit_affine(model, batches, [path])[path]
    z = pre_activations(model, path, batches).double()
    z = z.movedim(1, -1).reshape(-1, z.shape[1]).numpy()  # (values, channels)
    for c in range(z.shape[1]):
        y = act(torch.from_numpy(z[:, c]).float()).double().numpy()  # as the model computes it
        slope, icept = np.polyfit(z[:, c], y, 1)
        assert fit.a.reshape(-1)[c].item() == pytest.approx(slope, rel=1e-9, abs=1e-12)
        assert fit.b.reshape(-1)[c].item() == pytest.approx(icept, rel=1e-9, abs=1e-12)
    assert fit.samples == z.shape[0]
    assert fit.a.shape == ((z.shape[1], 1, 1) if net is conv_net else (z.shape[1],))


def test_constant_channel_gets_a_flat_fit():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight[1].zero_()  # channel 1 is its bias, 0.7, for every input
        model[0].bias[1] = 0.7
    fit = fit_affine(model, [torch.randn(20, 3)], ["1"])["1"]
    assert fit.a[1].item() == 0.0
    assert fit.b[1].item() == pytest.approx(0.7)


def test_affine_model_matches_a_hand_written_forward():
    model = mlp(torch.float64)
    data = [torch.randn(16, 7, dtype=torch.float64) for _ in range(2)]
    fits = fit_affine(model, data, ["1"])
    lin = linearize(model, ["1"], mode="affine", fits=fits, example_input=data[0])
    x = torch.randn(4, 7, dtype=torch.float64)
    l1, l2, l3 = model[0], model[2], model[4]
    a, b = fits["1"].a, fits["1"].b
    h = (x @ l1.weight.T + l1.bias) * a + b
    want = F.gelu(h @ l2.weight.T + l2.bias) @ l3.weight.T + l3.bias
    torch.testing.assert_close(lin(x), want, rtol=1e-12, atol=1e-12)
    assert edits_of(lin)[-1]["mode"] == "affine"
    assert {k for k, _ in lin.named_parameters()} >= {"1.affine.a", "1.affine.b"}


def test_shared_module_and_functional_sites_take_their_own_fit():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(F.relu(self.b(self.act(self.a(x)))))

    torch.manual_seed(2)
    model = Net().double().eval()
    data = [torch.randn(32, 4, dtype=torch.float64)]
    fits = fit_affine(model, data)
    assert set(fits) == {"act", ":relu"}
    lin = linearize(model, ["act", ":relu"], mode="affine", fits=fits, example_input=data[0])
    x = torch.randn(3, 4, dtype=torch.float64)
    h = model.a(x) * fits["act"].a + fits["act"].b
    h = model.b(h) * fits[":relu"].a + fits[":relu"].b
    torch.testing.assert_close(lin(x), model.c(h), rtol=1e-12, atol=1e-12)


def test_save_load_round_trip_under_weights_only(tmp_path):
    model = conv_net()
    data = [torch.randn(4, 3, 8, 8)]
    fits = fit_affine(model, data)
    lin = linearize(model, ["2"], mode="affine", fits=fits, example_input=data[0])
    lin = linearize(lin, ["5"], example_input=data[0])  # identity and affine in one model
    with torch.no_grad():
        lin[2].affine.a.mul_(1.5)  # as if fine-tuned: the weights, not the fit, are saved
    save_model(lin, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt", conv_net(), weights_only=True)
    assert edits_of(back) == edits_of(lin)
    torch.testing.assert_close(back[2].affine.a, lin[2].affine.a, rtol=0, atol=0)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(back(x), lin(x), rtol=0, atol=0)


def depth(gm: torch.fx.GraphModule) -> int:
    return sum(isinstance(gm.get_submodule(str(n.target)), (nn.Conv2d, nn.Linear))
               for n in gm.graph.nodes if n.op == "call_module")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("net", [conv_net, mlp])
def test_fold_is_exact_and_as_shallow_as_identity(net, dtype, tol):
    model = net(dtype)
    shape = (3, 8, 8) if net is conv_net else (7,)
    data = [torch.randn(8, *shape, dtype=dtype) for _ in range(2)]
    sites = ["2", "5"] if net is conv_net else ["1", "3"]
    fits = fit_affine(model, data)
    lin = linearize(model, sites, mode="affine", fits=fits, example_input=data[0],
                    fold_ready=True)
    ident = linearize(model, sites, example_input=data[0], fold_ready=True)
    x = torch.randn(5, *shape, dtype=dtype)
    folded = fold(lin, x, plan="all", rtol=tol, atol=tol)
    with torch.no_grad():
        want = lin(x)
        got = folded(x)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert depth(folded) == depth(fold(ident, x, plan="all")) == 1
    assert not any(n.op == "get_attr" for n in folded.graph.nodes)  # no a, b left over


def test_wrong_mode_is_a_config_error():
    model = mlp()
    with pytest.raises(ConfigError, match="mode"):
        linearize(model, ["1"], mode="affin")
    with pytest.raises(ConfigError, match="fits"):
        linearize(model, ["1"], mode="affine")
    with pytest.raises(ConfigError, match="linearize"):
        EntropyConfig(linearize="relu")
