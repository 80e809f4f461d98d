"""Tests for easier.models: site counts, fx tracing, training, shapes, specs, errors, Swin maths."""

from __future__ import annotations

import io
import json
import operator
import sys

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from easier import models
from easier.errors import ConfigError
from easier.models import _registry, swin
from easier.models._common import scaled

# Rectifier call sites of each model, as in the paper's appendix ("Rem." columns: /17, /15, /35,
# /12) and the model table of issue 5 (lenet 4, mlp 2, convnet 4).
EXPECTED_SITES = {
    "resnet18": 17,
    "resnet18-imagenet": 17,
    "vgg16_bn": 15,
    "mobilenet_v2": 35,
    "mobilenet_v2-imagenet": 35,
    "swin_t": 12,
    "lenet": 4,
    "mlp": 2,
    "convnet": 4,
}
ALL = sorted(EXPECTED_SITES)
ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU)
ACT_FUNCTIONS = {F.relu, F.relu6, F.gelu, torch.relu, torch.relu_, F.hardtanh}
ACT_METHODS = {"relu", "relu_", "gelu"}
TINY = 0.125  # width used throughout: every model runs in milliseconds


def activation_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Return the graph's rectifier calls, found independently of easier's own site finder."""
    modules = dict(gm.named_modules())

    def is_activation(node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules[node.target], ACT_MODULES)
        if node.op == "call_function":
            return node.target in ACT_FUNCTIONS
        return node.op == "call_method" and node.target in ACT_METHODS

    return [node for node in gm.graph.nodes if is_activation(node)]


def tiny(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, width=TINY, **kw)


def test_registry_lists_exactly_the_documented_models():
    assert models.list_models() == ALL


@pytest.mark.parametrize("name", ALL)
def test_sites_trace_and_traced_graph_matches_eager(name):
    model = tiny(name, image_size=32).eval()
    gm = fx.symbolic_trace(model)
    sites = activation_nodes(gm)
    assert len(sites) == EXPECTED_SITES[name]
    # one module per call site, so each can be measured and replaced on its own
    assert all(n.op == "call_module" for n in sites)
    assert len({n.target for n in sites}) == len(sites)
    assert all(not getattr(gm.get_submodule(n.target), "inplace", False) for n in sites)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        eager, traced = model(x), gm(x)
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-6)
    assert not torch.allclose(eager[0], eager[1])  # the output depends on the input


@pytest.mark.parametrize("name", ALL)
def test_one_sgd_step_trains(name):
    model = tiny(name, image_size=32, num_classes=5).train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(changed)  # every tensor takes part in the forward pass
    with torch.no_grad():
        assert F.cross_entropy(model.eval()(x), y) != loss


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("in_channels", "image_size"), [(1, 28), (1, 32), (3, 28), (3, 32)])
def test_output_shape(name, in_channels, image_size):
    model = tiny(name, in_channels=in_channels, image_size=image_size, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18-imagenet", "vgg16_bn"])
def test_imagenet_size(name):
    model = models.create(name, width=0.0625, image_size=224, num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 4)


def test_vgg_heads_follow_image_size():
    big = models.create("vgg16_bn", width=TINY, image_size=224)
    small = models.create("vgg16_bn", width=TINY, image_size=32)
    c = scaled(512, TINY)
    assert big.classifier[0].in_features == c * 7 * 7
    assert big.classifier[0].out_features == scaled(4096, TINY)
    assert small.classifier[0].in_features == c
    assert small.classifier[0].out_features == scaled(512, TINY)
    # ceil-mode pools: 28 -> 14 -> 7 -> 4 -> 2 -> 1 instead of collapsing to 0x0
    assert small.features(torch.randn(1, 3, 28, 28)).shape == (1, c, 1, 1)


# Published parameter counts: torchvision model docs (num_params) for the ImageNet layouts;
# the CIFAR ResNet-18 is torchvision's with a 3x3 stem and a 10-way head (11,689,512 - 64*3*49
# + 64*3*9 - 512*990 - 990); LeNet-5 (6,16,120,84) on 1x32x32 is the classic 61,706.
PUBLISHED = [
    ("resnet18", 10, 32, 11_173_962),
    ("resnet18-imagenet", 1000, 224, 11_689_512),
    ("vgg16_bn", 1000, 224, 138_365_992),
    ("mobilenet_v2", 1000, 224, 3_504_872),  # strides differ from torchvision, weights do not
    ("mobilenet_v2-imagenet", 1000, 224, 3_504_872),
    ("swin_t", 1000, 224, 28_288_354),
    ("lenet", 10, 32, 61_706),
    ("mlp", 10, 28, 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10),
]


@pytest.mark.parametrize(("name", "classes", "size", "count"), PUBLISHED)
def test_full_width_parameter_counts_match_published(name, classes, size, count):
    in_channels = 1 if name in ("lenet", "mlp") else 3  # LeNet-5 and the MLP read MNIST
    with torch.device("meta"):  # no memory, no init cost
        model = models.create(name, num_classes=classes, image_size=size, in_channels=in_channels)
    assert sum(p.numel() for p in model.parameters()) == count


def _input_of(node: fx.Node) -> fx.Node:
    arg = node.args[0]
    assert isinstance(arg, fx.Node)
    return arg


def test_resnet_block_has_relu1_after_bn1_and_relu2_after_the_add():
    gm = fx.symbolic_trace(tiny("resnet18"))
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    relu2 = [t for t in by_target if t.endswith("relu2")]
    assert len(relu2) == 8
    for t in relu2:
        assert _input_of(by_target[t]).target in (operator.add, torch.add)
        assert _input_of(by_target[t.replace("relu2", "relu1")]).target == t.replace("relu2", "bn1")
    downsampled = [t for t in by_target if t.endswith("downsample.0")]
    assert downsampled == [
        "layer2.0.downsample.0",
        "layer3.0.downsample.0",
        "layer4.0.downsample.0",
    ]


def test_mobilenet_residuals_and_expansion_free_first_block():
    model = tiny("mobilenet_v2")
    gm = fx.symbolic_trace(model)
    adds = [n for n in gm.graph.nodes if n.target in (operator.add, torch.add)]
    # identity shortcuts: stride 1 and equal widths -> repeats after the first of each setting
    # with n > 1: (24: 1) + (32: 2) + (64: 3) + (96: 2) + (160: 2) = 10
    assert len(adds) == 10
    first = model.features[1].conv
    assert sum(isinstance(m, nn.ReLU6) for m in first.modules()) == 1
    assert first[0][0].groups == first[0][0].in_channels  # depthwise comes first when t = 1
    assert model.last_channel == scaled(1280, TINY)


def test_convnet_residual_add_feeds_relu3():
    gm = fx.symbolic_trace(tiny("convnet"))
    relu3 = next(n for n in gm.graph.nodes if n.target == "relu3")
    assert _input_of(relu3).target in (operator.add, torch.add)


def test_swin_widths_split_into_heads():
    model = tiny("swin_t")
    blocks = [m for m in model.modules() if isinstance(m, swin.SwinTransformerBlock)]
    dims = sorted({b.attn.dim for b in blocks})
    assert dims == [h * scaled(32, TINY) for h in swin.NUM_HEADS]
    assert all(b.attn.dim % b.attn.num_heads == 0 for b in blocks)
    assert [b.mlp[0].out_features for b in blocks] == [4 * b.attn.dim for b in blocks]


def test_swin_auto_geometry_documented_sizes():
    def grid(size):
        patch, window = swin.auto_patch_window(size)
        geo = swin.stage_geometry(size, patch, window)
        return patch, [(g.resolution, g.window, g.shift, g.padded) for g in geo]

    assert grid(224) == (4, [(56, 7, 3, 56), (28, 7, 3, 28), (14, 7, 3, 14), (7, 7, 0, 7)])
    assert grid(32) == (2, [(16, 4, 2, 16), (8, 4, 2, 8), (4, 4, 0, 4), (2, 2, 0, 2)])
    assert grid(28) == (2, [(14, 7, 3, 14), (7, 7, 0, 7), (4, 4, 0, 4), (2, 2, 0, 2)])


def test_relative_position_index_matches_formula():
    w = 3
    idx = swin.relative_position_index(w).view(w * w, w * w)
    for p in range(w * w):
        for q in range(w * w):
            dy, dx = p // w - q // w, p % w - q % w
            assert idx[p, q] == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)


def _allowed(res: int, padded: int, ws: int, shift: int) -> torch.Tensor:
    """Return allowed[q, k] over real tokens: same shifted window, and the cyclic roll did not
    carry k to the far side of q (a different characterisation than torchvision's region labels)."""
    coords = [(i, j) for i in range(res) for j in range(res)]
    allowed = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for a, (qi, qj) in enumerate(coords):
        for b, (ki, kj) in enumerate(coords):
            ok = True
            for q, k in ((qi, ki), (qj, kj)):
                q2, k2 = (q - shift) % padded, (k - shift) % padded
                ok &= q2 // ws == k2 // ws and q2 - k2 == q - k
            allowed[a, b] = ok
    return allowed


def naive_window_attention(attn: swin.ShiftedWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Return attention computed token by token over `_allowed` keys (no windows, no rolls)."""
    res, _, dim = x.shape
    heads, hd, ws = attn.num_heads, attn.head_dim, attn.window_size
    n = res * res
    qkv = attn.qkv(x.reshape(n, dim)).view(n, 3, heads, hd)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    allowed = _allowed(res, attn.padded, ws, attn.shift_size)
    out = torch.zeros(n, heads, hd, dtype=x.dtype)
    for a in range(n):
        keys = allowed[a].nonzero().flatten().tolist()
        # inside a window, with no wrap, relative offsets are plain coordinate differences
        rows = [
            (a // res - b // res + ws - 1) * (2 * ws - 1) + (a % res - b % res + ws - 1)
            for b in keys
        ]
        logits = (q[a] * k[keys]).sum(-1) * hd**-0.5 + attn.relative_position_bias_table[rows]
        weights = logits.softmax(dim=0)  # over keys, per head
        out[a] = (weights.unsqueeze(-1) * v[keys]).sum(0)
    return attn.proj(out.reshape(n, dim)).view(res, res, dim)


@pytest.mark.parametrize(
    ("res", "window", "shifted"),
    # shift only; shift + padding (both masks bite); padding only; window clipped to the grid
    [(8, 4, True), (11, 4, True), (7, 3, False), (5, 8, True)],
)
def test_window_attention_matches_token_by_token_reference(res, window, shifted):
    geo = swin.stage_geometry(res, 1, window, n_stages=1)[0]
    torch.manual_seed(1)
    attn = swin.ShiftedWindowAttention(8, 2, geo, shifted).double().eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
        x = torch.randn(2, res, res, 8, dtype=torch.float64)
        got = attn(x)
        for i in range(2):
            torch.testing.assert_close(
                got[i], naive_window_attention(attn, x[i]), atol=1e-10, rtol=0
            )
    assert attn.shift_size == (geo.shift if shifted else 0)
    assert (attn.shift_size > 0) == (shifted and res > window)


def test_stochastic_depth_stays_live_after_tracing():
    torch.manual_seed(0)
    model = models.create("swin_t", width=0.0625, stochastic_depth_prob=0.5)
    gm = fx.symbolic_trace(model.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=1e-6)
        gm.train()
        outs = [gm(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


@settings(max_examples=12, deadline=None)
@given(
    image_size=st.integers(6, 48),
    window=st.integers(2, 8),
    patch=st.sampled_from([1, 2, 3, 4]),
)
def test_swin_any_geometry_traces_and_runs(image_size, window, patch):
    if image_size < patch:
        return
    torch.manual_seed(0)
    model = models.create(
        "swin_t", width=0.0625, image_size=image_size, patch_size=patch, window_size=window
    ).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(gm(x), out, rtol=0, atol=1e-6)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_spec_round_trip_reloads_state_dict(name, tmp_path):
    model = tiny(name, in_channels=1, image_size=28, num_classes=3)
    model.train()(torch.randn(4, 1, 28, 28))  # move BN running statistics off their init
    spec = models.spec_of(model)
    assert spec is not None
    assert spec["name"] == name and spec["width"] == TINY and spec["in_channels"] == 1
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))

    torch.manual_seed(123)
    clone = models.create_from_spec(json.loads(spec_file.read_text()))
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    clone.eval()
    with torch.no_grad():
        assert not torch.allclose(clone(x), model(x))  # a fresh init differs...
        clone.load_state_dict(torch.load(path, weights_only=True), strict=True)
        assert torch.equal(clone(x), model(x))  # ...until the saved weights are loaded
    assert models.spec_of(clone) == spec


def test_spec_records_defaults_and_is_a_copy():
    model = models.create("vgg16_bn", width=TINY, image_size=28)
    spec = models.spec_of(model)
    assert spec == {
        "name": "vgg16_bn",
        "num_classes": 10,
        "in_channels": 3,
        "width": TINY,
        "image_size": 28,
        "head": "auto",
        "dropout": 0.5,
    }
    spec["width"] = 9.0
    assert models.spec_of(model)["width"] == TINY
    assert models.spec_of(nn.Linear(2, 2)) is None


def test_spec_survives_state_dict_buffer_round_trip_through_bytes():
    model = tiny("swin_t")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert not any(k.endswith("attn_mask") for k in state)  # derived from the spec, not saved
    models.create_from_spec(models.spec_of(model)).load_state_dict(state, strict=True)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        models.create("resnet19")
    assert all(name in str(info.value) for name in ALL)


@pytest.mark.parametrize(
    ("name", "kwargs", "must_mention"),
    [
        ("swin_t", {"window": 4}, ["window_size", "patch_size", "stochastic_depth_prob"]),
        ("vgg16_bn", {"heads": "cifar"}, ["head", "dropout"]),
        ("lenet", {"hidden": 3}, ["none"]),
    ],
)
def test_unknown_option_names_valid_options(name, kwargs, must_mention):
    with pytest.raises(ConfigError) as info:
        models.create(name, **kwargs)
    assert all(word in str(info.value) for word in must_mention)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": True},
        {"in_channels": 2.5},
        {"width": 0},
        {"width": float("nan")},
        {"image_size": -3},
        {"image_size": 8, "name": "lenet"},
        {"head": "big", "name": "vgg16_bn"},
        {"dropout": 1.0, "name": "mobilenet_v2"},
        {"dropout": object(), "name": "vgg16_bn"},
        {"window_size": 0, "name": "swin_t"},
        {"patch_size": 8, "image_size": 4, "name": "swin_t"},
        {"hidden": 0, "name": "mlp"},
    ],
)
def test_bad_values_raise_config_error(kwargs):
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "convnet")
    with pytest.raises(ConfigError):
        models.create(name, **kwargs)


def test_bad_specs_raise_config_error():
    with pytest.raises(ConfigError, match="name"):
        models.create_from_spec({"num_classes": 3})
    with pytest.raises(ConfigError):
        models.create_from_spec(["resnet18"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        models.create_from_spec({"name": "mlp", "depth": 3})


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_third_party_import_failure_says_what_to_do(package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail everywhere
    with pytest.raises(ConfigError) as info:
        models.create(f"{package}:resnet18", num_classes=4)
    message = str(info.value)
    assert "cannot be imported" in message and "nn.Module" in message and package in message


def test_third_party_misuse_is_rejected_before_importing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ConfigError, match="width"):
        models.create("torchvision:resnet18", width=0.5)
    with pytest.raises(ConfigError, match="torchvision:NAME"):
        models.create("keras:resnet18")


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))


def test_register_model_builds_and_checks_builders(scratch_registry):
    @models.register_model("toy")
    def toy(num_classes, in_channels, width, image_size, bias: bool = True):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes, bias=bias)
        )

    model = models.create("toy", num_classes=2, in_channels=1, image_size=4, bias=False)
    assert model[1].bias is None and model[1].in_features == 16
    assert models.spec_of(model)["bias"] is False
    assert "toy" in models.list_models()

    with pytest.raises(ConfigError, match="already registered"):

        @models.register_model("toy")
        def other(num_classes, in_channels, width, image_size):
            return nn.Identity()

    with pytest.raises(ConfigError, match="image_size"):
        models.register_model("no-size")(lambda num_classes, in_channels, width: nn.Identity())
    with pytest.raises(ConfigError, match="kwargs"):
        models.register_model("loose")(
            lambda num_classes, in_channels, width, image_size, **kw: nn.Identity()
        )
    with pytest.raises(ConfigError, match="':'"):
        models.register_model("a:b")
