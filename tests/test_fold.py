import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import easier
from _harness import InvertedResidual, rand_bn
from easier.edit.linearize import edits_of
from easier.edit.padding import conv_paddings, fold_ready, relocate
from easier.errors import FoldError, TraceError
from easier.graph.capture import capture
from easier.graph.sites import graph_sites
from easier.merge import fold, plan_fold

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def count(model: nn.Module, cls: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def ops(gm: fx.GraphModule) -> list[str]:
    """The aten ops (by name) a folded graph still calls as functions, in order."""
    return [str(n.target).split(".")[1] for n in gm.graph.nodes if n.op == "call_function"]


def layers(gm: fx.GraphModule) -> list[str]:
    """The layer calls of a folded graph: eager module paths, in order."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def max_err(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


class BasicBlock(nn.Module):
    """ResNet BasicBlock with its inner ReLU removed (nn.Identity), ReLU after the add."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = rand_bn(cout)
        self.relu1 = nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = rand_bn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), rand_bn(cout)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return self.relu2(out)


class Mlp(nn.Module):
    def __init__(self, c: int = 6, residual: bool = False) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.Identity(), nn.Linear(4 * c, c)
        self.drop = nn.Dropout(0.1)
        self.residual = residual

    def forward(self, x):
        y = self.drop(self.fc2(self.act(self.fc1(x))))
        return torch.add(x, y) if self.residual else y


# ---------------------------------------------------------------------------------------------
# BN folding


def test_bn_fold_matches_torch_fusion_and_is_done_in_mode_none():
    m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), rand_bn(5), nn.ReLU()).to(D).eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    folded = fold(m, x, "none")
    assert count(folded, nn.BatchNorm2d) == 0 and count(folded, nn.Conv2d) == 1
    ref = fuse_conv_bn_eval(copy.deepcopy(m[0]), copy.deepcopy(m[1]))  # independent cross-check
    conv = next(c for c in folded.modules() if isinstance(c, nn.Conv2d))
    torch.testing.assert_close(conv.weight, ref.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.bias, ref.bias, rtol=0, atol=1e-12)
    assert folded.fold_plan.bn_folded == ["0<-1"]
    assert folded.fold_plan.max_abs_error < 1e-12


def test_linear_bn1d_folds_and_bn_after_nothing_foldable_stays():
    m = (
        nn.Sequential(
            nn.Linear(4, 5), rand_bn(5, nn.BatchNorm1d), nn.ReLU(), rand_bn(5, nn.BatchNorm1d)
        )
        .to(D)
        .eval()
    )
    x = torch.randn(7, 4, dtype=D)
    folded = fold(m, x, "all")
    assert count(folded, nn.BatchNorm1d) == 1  # the one after the ReLU has nothing to fold into
    assert max_err(m, folded, x) < 1e-12


def test_bn_not_folded_into_conv_with_two_users():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), rand_bn(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) * y

    m = M().to(D).eval()
    x = torch.randn(1, 2, 4, 4, dtype=D)
    folded = fold(m, x, "all")
    assert count(folded, nn.BatchNorm2d) == 1
    assert max_err(m, folded, x) < 1e-12


# ---------------------------------------------------------------------------------------------
# padding relocation


def _chain(k1, s1, p1, k2, s2, p2, d1=1, d2=1):
    return nn.Sequential(
        nn.Conv2d(2, 3, k1, s1, p1, dilation=d1),
        rand_bn(3),
        nn.Identity(),
        nn.Conv2d(3, 2, k2, s2, p2, dilation=d2),
    )


@settings(max_examples=30, deadline=None)
@given(
    k=st.lists(st.sampled_from([1, 3, 5]), min_size=2, max_size=3),
    s=st.lists(st.sampled_from([1, 2]), min_size=3, max_size=3),
    p=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    size=st.tuples(st.integers(29, 34), st.integers(29, 34)),
)
def test_relocation_keeps_output_shape_and_moves_all_padding(k, s, p, size):
    layers: list[nn.Module] = []
    for i, kk in enumerate(k):
        layers += [nn.Conv2d(2, 2, kk, s[i], p[i]), nn.Identity()]
    m = nn.Sequential(*layers).eval()
    x = torch.randn(1, 2, *size)
    ready = fold_ready(m, x)
    assert ready(x).shape == m(x).shape
    convs = [c for c in ready.modules() if isinstance(c, nn.Conv2d)]
    total = p[0] + sum(p[i] * math.prod(s[:i]) for i in range(1, len(k)))
    assert convs[0].padding == (total, total)
    assert all(c.padding == (0, 0) for c in convs[1:])


def test_relocation_changes_only_the_border_ring():
    m = _chain(3, 1, 1, 3, 1, 1).to(D).eval()
    x = torch.randn(1, 2, 10, 10, dtype=D)
    ready = fold_ready(m, x)
    diff = (ready(x) - m(x)).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-12  # interior unchanged
    assert diff.max() > 1e-3  # the ring really changed: that is the documented trade-off


def test_relocate_padding_from_removed_sites_is_idempotent():
    m = nn.Sequential(
        nn.Conv2d(2, 4, 1),
        rand_bn(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        rand_bn(4),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1),
    ).eval()
    x = torch.randn(2, 2, 6, 6)
    cap = capture(m, x)
    located = {g.site.name: g for g in graph_sites(m, cap)}
    assert list(located) == ["2", "5", "7"]
    # what linearize(["2", "5"]) does: the chain 0 -> 3 -> 6 ends at the remaining ReLU "7"
    padding = relocate(m, cap, [located["2"], located["5"]])
    assert padding == {"0": [2, 2], "3": [0, 0], "6": [0, 0]}
    assert m[0].padding == (0, 0) and m[6].padding == (1, 1)  # relocate only reads the model
    moved = copy.deepcopy(m)
    conv_paddings(moved, padding)
    assert [moved[i].padding for i in (0, 3, 6, 8)] == [(2, 2), (0, 0), (0, 0), (1, 1)]
    with torch.no_grad():
        assert moved(x).shape == m(x).shape
    cap2 = capture(moved, x)
    again = {g.site.name: g for g in graph_sites(moved, cap2)}
    assert relocate(moved, cap2, [again["2"], again["5"]]) == {}  # already relocated
    assert relocate(m, cap, []) == {}
    lin = easier.linearize(m, ["2", "5"], example_input=x, fold_ready=True)
    assert edits_of(lin)[-1]["padding"] == padding
    # the ReLUs still break every chain of the original model: nothing to relocate
    assert fold_ready(m, x).relocated_convs == []


def test_linearize_fold_ready_then_fold_is_exact():
    import easier

    m = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            rand_bn(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3, padding=1),
            rand_bn(3),
            nn.ReLU(),
        )
        .to(D)
        .eval()
    )
    x = torch.randn(2, 3, 7, 7, dtype=D)
    site = easier.find_sites(m, x)[0].name
    assert site == "2"
    lin = easier.linearize(m, [site], example_input=x, fold_ready=True)
    assert edits_of(lin)[-1]["padding"] == {"0": [2, 2], "3": [0, 0]}
    folded = fold(lin, x, "all", rtol=0, atol=1e-10)
    assert count(folded, nn.Conv2d) == 1 and ops(folded) == ["relu"]
    assert layers(folded) == ["0"]
    assert max_err(lin, folded, x) < 1e-10
    assert not isinstance(lin, fx.GraphModule) and isinstance(folded, fx.GraphModule)


class FunctionalAndShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(2, 3, 3, padding=1), rand_bn(3)
        self.b = nn.Conv2d(3, 2, 3, padding=1)
        self.shared = nn.ReLU()

    def forward(self, x):
        y = self.shared(F.relu(self.bn(self.a(x))))
        return self.shared(self.b(y))


def test_fold_sees_functional_and_per_call_switches_of_a_linearized_model():
    m = FunctionalAndShared().to(D).eval()
    x = torch.randn(2, 2, 6, 6, dtype=D)
    assert [s.name for s in easier.find_sites(m, x)] == [":relu", "shared", "shared@1"]
    lin = easier.linearize(m, [":relu", "shared"], example_input=x, fold_ready=True)
    folded = fold(lin, x, "all", rtol=0, atol=1e-10)
    assert layers(folded) == ["a"] and ops(folded) == ["relu"]  # shared@1 is still there
    (conv,) = [c for c in folded.modules() if isinstance(c, nn.Conv2d)]
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2)
    # independent reference: the eager model, by hand, with the relocated paddings
    with torch.no_grad():
        y = F.conv2d(x, m.a.weight, m.a.bias, padding=2)
        y = F.batch_norm(y, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias,
                         eps=m.bn.eps)
        want = torch.relu(F.conv2d(y, m.b.weight, m.b.bias))
        torch.testing.assert_close(folded(x), want, rtol=0, atol=1e-10)
        torch.testing.assert_close(lin(x), want, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# property test: random conv chains


class RandomChain(nn.Module):
    def __init__(
        self, body: nn.Sequential, shortcut: nn.Module | None, identity: bool, skip_first: bool
    ) -> None:
        super().__init__()
        self.body, self.shortcut = body, shortcut
        self.identity, self.skip_first = identity, skip_first

    def forward(self, x):
        y = self.body(x)
        if self.identity:
            return x + y if self.skip_first else y + x
        if self.shortcut is not None:
            return self.shortcut(x) + y if self.skip_first else y + self.shortcut(x)
        return y


@st.composite
def random_chains(draw):
    n = draw(st.integers(1, 3))
    skip = draw(st.sampled_from(["identity", "shortcut"] + (["none"] if n > 1 else [])))
    residual, identity = skip != "none", skip == "identity"  # shortcut: a 1x1 (+BN) conv
    c0 = cin = draw(st.sampled_from([2, 3]))
    layers: list[nn.Module] = []
    stride, kernel, padding = 1, 1, 0  # merged geometry, to pick a big enough input
    for i in range(n):
        k = draw(st.sampled_from([1, 3, 5]))
        s = draw(st.sampled_from([1, 2])) if stride < 4 and not identity else 1
        d = draw(st.sampled_from([1, 2])) if k > 1 else 1
        cout = cin if draw(st.booleans()) else draw(st.sampled_from([2, 3, 4]))
        if identity and i == n - 1:
            cout = c0
        dw = cout == cin and draw(st.booleans())
        same = residual or draw(st.booleans())
        pad = d * (k - 1) // 2 if same else draw(st.integers(0, d * (k - 1) // 2))
        layers.append(
            nn.Conv2d(
                cin, cout, k, s, pad, dilation=d, groups=cin if dw else 1, bias=draw(st.booleans())
            )
        )
        if draw(st.booleans()):
            layers.append(rand_bn(cout))
        layers.append(nn.Identity())  # the removed activation
        kernel, padding = kernel + stride * d * (k - 1), padding + stride * pad
        cin, stride = cout, stride * s
    shortcut = None
    if residual and not identity:
        shortcut = nn.Sequential(nn.Conv2d(c0, cin, 1, stride, bias=draw(st.booleans())))
        if draw(st.booleans()):
            shortcut.append(rand_bn(cin))
    model = RandomChain(nn.Sequential(*layers), shortcut, identity, draw(st.booleans()))
    least = max(kernel - 2 * padding, 1)
    size = (least + draw(st.integers(0, 6)), least + draw(st.integers(0, 6)))
    return model.to(D).eval(), size


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_chains(), seed=st.integers(0, 2**16))
def test_random_chains_fold_to_one_conv_exactly_after_relocation(case, seed):
    model, size = case
    torch.manual_seed(seed)
    for mod in model.modules():  # fresh random weights and BN statistics per example
        if isinstance(mod, nn.Conv2d):
            nn.init.normal_(mod.weight, std=0.5)
            if mod.bias is not None:
                nn.init.normal_(mod.bias)
    c0 = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, c0, *size, dtype=D)
    ready = fold_ready(model, x)
    folded = fold(ready, x, "all", rtol=0, atol=1e-10)
    assert count(folded, nn.Conv2d) == 1
    assert count(folded, nn.BatchNorm2d) == 0
    assert [n.op for n in folded.graph.nodes] == ["placeholder", "call_module", "output"]
    assert max_err(ready, folded, x) <= 1e-10
    assert max_err(ready, folded, torch.randn_like(x)) <= 1e-10


# ---------------------------------------------------------------------------------------------
# explicit cases


@pytest.mark.parametrize(("cin", "stride", "kernel"), [(6, 1, 5), (3, 2, 7)])
def test_basic_block_becomes_one_conv_plus_relu(cin, stride, kernel):
    m = BasicBlock(cin, 6, stride).to(D).eval()
    x = torch.randn(2, cin, 8, 8, dtype=D)
    ready = fold_ready(m, x)
    folded = fold(ready, x, "all", rtol=0, atol=1e-10)
    assert count(folded, nn.Conv2d) == 1 and ops(folded) == ["relu"]
    assert layers(folded) == ["conv1"]  # the merged conv is named after the chain's first
    conv = next(c for c in folded.modules() if isinstance(c, nn.Conv2d))
    assert conv.kernel_size == (kernel, kernel) and conv.stride == (stride, stride)
    assert conv.padding == (kernel // 2, kernel // 2)
    assert max_err(ready, folded, x) < 1e-10
    assert folded.fold_plan.chains[0].residual == ("identity" if stride == 1 else "shortcut.0")


def test_inverted_residual_becomes_one_dense_conv_with_identity_folded_in():
    m = InvertedResidual(4).to(D).eval()
    x = torch.randn(2, 4, 6, 6, dtype=D)
    ready = fold_ready(m, x)
    folded = fold(ready, x, "all", rtol=0, atol=1e-10)
    assert count(folded, nn.Conv2d) == 1
    conv = next(c for c in folded.modules() if isinstance(c, nn.Conv2d))
    assert conv.kernel_size == (3, 3) and conv.groups == 1 and conv.padding == (1, 1)
    assert not any(n.op == "call_function" for n in folded.graph.nodes)  # the add is gone
    assert max_err(ready, folded, x) < 1e-10


def test_depthwise_chain_stays_depthwise_and_groups_are_re_emitted():
    m = (
        nn.Sequential(
            nn.Conv2d(4, 4, 3, groups=4, padding=1),
            nn.Conv2d(4, 4, 3, groups=4),
            nn.Conv2d(4, 8, 1, groups=2),
            nn.Conv2d(8, 8, 3, groups=2),
        )
        .to(D)
        .eval()
    )
    x = torch.randn(1, 4, 9, 9, dtype=D)
    dw = fold(m[:2], x, "all", rtol=0, atol=1e-10)
    (conv,) = [c for c in dw.modules() if isinstance(c, nn.Conv2d)]
    assert conv.groups == 4 and conv.weight.shape == (4, 1, 5, 5)
    mixed = fold(m, x, "all", rtol=0, atol=1e-10)
    (conv,) = [c for c in mixed.modules() if isinstance(c, nn.Conv2d)]
    assert conv.groups == 2 and conv.kernel_size == (7, 7)
    assert max_err(m, mixed, x) < 1e-10


def test_conv1d_chain_with_stride_and_dilation():
    m = nn.Sequential(nn.Conv1d(3, 5, 3, 2, 4, dilation=2), nn.Conv1d(5, 2, 3, dilation=3))
    m = m.to(D).eval()
    x = torch.randn(2, 3, 20, dtype=D)
    folded = fold(m, x, "all", rtol=0, atol=1e-10)
    (conv,) = [c for c in folded.modules() if isinstance(c, nn.Conv1d)]
    assert conv.kernel_size == (2 * 2 + 2 * 3 * 2 + 1,) and conv.stride == (2,)
    assert max_err(m, folded, x) < 1e-10


def test_transformer_mlp_becomes_one_linear_on_token_tensors():
    m = Mlp(6).to(D).eval()
    x = torch.randn(2, 5, 6, dtype=D)
    folded = fold(m, x, "all", rtol=0, atol=1e-10)
    (lin,) = [c for c in folded.modules() if isinstance(c, nn.Linear)]
    assert lin.weight.shape == (6, 6)
    torch.testing.assert_close(lin.weight, m.fc2.weight @ m.fc1.weight)
    torch.testing.assert_close(lin.bias, m.fc2.weight @ m.fc1.bias + m.fc2.bias)
    assert count(folded, nn.Dropout) == 0


def test_linear_residual_adds_identity_to_weight():
    m = Mlp(6, residual=True).to(D).eval()
    x = torch.randn(3, 6, dtype=D)
    folded = fold(m, x, "all", rtol=0, atol=1e-10)
    (lin,) = [c for c in folded.modules() if isinstance(c, nn.Linear)]
    want = m.fc2.weight @ m.fc1.weight + torch.eye(6, dtype=D)
    torch.testing.assert_close(lin.weight, want)
    assert max_err(m, folded, x) < 1e-10


class Stops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.c3, self.c4 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()
        self.c5, self.c6 = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1)
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.c2(self.c1(x))  # c1 c2 merge; pooling stops
        y = self.relu(self.c4(self.c3(self.pool(y))))  # c3 c4 merge; a remaining ReLU stops
        y = torch.flatten(F.adaptive_avg_pool2d(self.c6(self.c5(y)), 1), 1)  # c5 c6; flatten
        return self.fc2(self.norm(self.fc1(y)))  # LayerNorm stops


def test_folding_stops_at_pooling_relu_layernorm():
    m = Stops().to(D).eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    folded = fold(m, x, "all", rtol=0, atol=1e-10)
    assert count(folded, nn.Conv2d) == 3
    assert count(folded, nn.Linear) == 2
    assert layers(folded) == ["c1", "c3", "c5", "fc1", "fc2"]
    assert ops(folded) == ["max_pool2d", "relu", "adaptive_avg_pool2d", "flatten", "layer_norm"]
    chains = [c.modules for c in folded.fold_plan.chains]
    assert chains == [["c1", "c2"], ["c3", "c4"], ["c5", "c6"]]
    assert max_err(m, folded, x) < 1e-10


def test_shared_conv_and_reflect_padding_are_not_merged():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 1)
            self.b = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
            self.c = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.b(self.c(self.a(self.a(x))))

    m = M().to(D).eval()
    x = torch.randn(1, 2, 5, 5, dtype=D)
    folded = fold(m, x, "all", rtol=0, atol=1e-10)
    # a is called twice (shared: not merged); the reflect pad sits between c and b
    assert folded.fold_plan.chains == []
    assert count(folded, nn.Conv2d) == 3 and layers(folded) == ["a", "a", "c", "b"]
    assert max_err(m, folded, x) < 1e-10


def test_reflect_padded_conv_merges_with_what_follows_it():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
            self.c = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.c(self.b(x))

    # the reflect pad is applied to the input before b: b -> c has no padding between them,
    # so merging is exact (the merged conv keeps the explicit reflect pad in front)
    m = M().to(D).eval()
    x = torch.randn(2, 2, 5, 5, dtype=D)
    folded = fold(m, x, "all", rtol=0, atol=1e-10)
    assert [c.modules for c in folded.fold_plan.chains] == [["b", "c"]]
    assert count(folded, nn.Conv2d) == 1
    with torch.no_grad():
        w = torch.einsum("oc,cikl->oikl", m.c.weight[:, :, 0, 0], m.b.weight)
        bias = m.c.weight[:, :, 0, 0] @ m.b.bias + m.c.bias
        want = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, bias)
        torch.testing.assert_close(folded(x), want, rtol=0, atol=1e-10)
        torch.testing.assert_close(m(x), want, rtol=0, atol=1e-10)


def test_unrelocated_chain_is_refused_and_a_forced_merge_fails_verification():
    m = _chain(3, 1, 1, 3, 1, 1).to(D).eval()
    x = torch.randn(2, 2, 6, 6, dtype=D)
    plan = plan_fold(m, x, "all")
    (decision,) = plan.chains
    assert decision.decision == "keep" and decision.reason.startswith("padding not relocated")
    assert count(fold(m, x, "all"), nn.Conv2d) == 2
    decision.decision = "merge"  # force the naive merge: verification must catch it
    with pytest.raises(FoldError, match="max \\|err\\|"):
        fold(m, x, plan)


def test_input_model_untouched_result_in_eval_and_plan_attached():
    m = BasicBlock(4, 4)
    m.train()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 4, 6, 6)
    folded = fold(fold_ready(m, x), x, "all")
    assert m.training and all(mod.training for mod in m.modules())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert m.conv1.padding == (1, 1)  # fold_ready worked on a copy
    assert not folded.training and folded.fold_plan.max_abs_error is not None


def test_untraceable_model_raises_fold_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else x

    with pytest.raises(FoldError, match=r"torch\.export cannot capture Branchy"):
        fold(Branchy(), torch.randn(1, 2, 3, 3))
    with pytest.raises(TraceError, match=r"torch\.export cannot capture Branchy"):
        fold_ready(Branchy(), torch.randn(1, 2, 3, 3))


def test_chain_is_cut_at_a_residual_add_that_feeds_more_layers():
    class TwoBlocks(nn.Module):  # BasicBlocks with every ReLU removed
        def __init__(self):
            super().__init__()
            self.b1, self.b2 = BasicBlock(4, 4), BasicBlock(4, 4)
            self.b1.relu2 = self.b2.relu2 = nn.Identity()

        def forward(self, x):
            return self.b2(self.b1(x))

    m = TwoBlocks().to(D).eval()
    x = torch.randn(2, 4, 7, 7, dtype=D)
    ready = fold_ready(m, x)
    folded = fold(ready, x, "all", rtol=0, atol=1e-10)
    assert [c.residual for c in folded.fold_plan.chains] == ["identity", "identity"]
    assert count(folded, nn.Conv2d) == 2  # one per block: the skip path is not duplicated
    assert layers(folded) == ["b1.conv1", "b2.conv1"]
    assert max_err(ready, folded, x) < 1e-10


# --- fold outputs of a run directory (easier.run_outputs) ------------------------------------


@pytest.fixture
def fold_dir(tmp_path):
    """A run directory as `easier reduce` leaves it: config.json and a linearized model.pt."""
    from easier import models
    from easier.io.records import RunDir, save_model

    torch.manual_seed(0)
    base = models.create("convnet", num_classes=10, in_channels=1, width=0.25, image_size=8)
    x = torch.randn(2, 1, 8, 8)
    site = easier.find_sites(base, x)[0].name
    model = easier.linearize(base, [site], example_input=x, fold_ready=True).eval()
    run = RunDir(tmp_path / "run")
    run.start({"model": "convnet", "input_shape": [1, 8, 8]}, resume=False)
    save_model(model, run.file("model.pt"))
    return run.path, model


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_fold_run_writes_pt2_first_and_every_file_checksummed(fold_dir):
    import hashlib
    import json as _json

    from easier.io.artifacts import fold_run
    from easier.io.records import CHECKSUMS, verify_file

    path, model = fold_dir
    out = fold_run(path, "all", batch_sizes=(1, 2))
    written = ["fold.md", "fold_measure.json", "fold_plan.json", "folded.pt2"]
    assert out["files"] == ["folded.pt2"] and not (path / "folded.pt").exists()
    recorded = _json.loads((path / CHECKSUMS).read_text())["files"]
    for name in written:
        assert recorded[name][0] == hashlib.sha256((path / name).read_bytes()).hexdigest(), name
        assert verify_file(path / name) is True
    measured = _json.loads((path / "fold_measure.json").read_text())
    assert all(lat["runs"] >= 5 for side in ("before", "after")
               for lat in measured[side]["latency"])
    # timed side by side: one paired comparison per measured batch size, its band around it
    sizes = [lat["batch_size"] for lat in measured["before"]["latency"]]
    assert [p["batch_size"] for p in measured["paired"]] == sizes
    assert all(p["ratio_lo"] <= p["ratio"] <= p["ratio_hi"] for p in measured["paired"])
    # the artifact loads without easier, with any batch size, and computes the reduced model
    program = torch.export.load(str(path / "folded.pt2")).module()
    for b in (1, 3):
        xb = torch.randn(b, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(program(xb), model(xb), rtol=1e-4, atol=1e-5)


def test_flipped_byte_in_folded_pt2_is_caught_on_load(fold_dir):
    from easier.io.artifacts import fold_run, load_folded
    from easier.io.records import verify_file

    path, model = fold_dir
    fold_run(path, "none", batch_sizes=(1,))
    xb = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_folded(path)(xb), model(xb), rtol=1e-4, atol=1e-5)
    raw = bytearray((path / "folded.pt2").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (path / "folded.pt2").write_bytes(bytes(raw))
    with pytest.raises(easier.StateError, match=r"folded\.pt2 is corrupt"):
        verify_file(path / "folded.pt2")
    with pytest.raises(easier.StateError, match=r"folded\.pt2 is corrupt"):
        load_folded(path / "folded.pt2")


def test_onnx_without_the_extra_fails_first_and_writes_nothing(fold_dir, monkeypatch, capsys):
    import sys

    from easier.cli import main
    from easier.io.artifacts import fold_run

    path, _ = fold_dir
    fold_run(path, "none", batch_sizes=(1,), torchscript=True)  # a complete earlier fold
    before = _snapshot(path)
    assert {"folded.pt", "folded.pt2", "fold.md", "fold_plan.json"} <= set(before)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(FoldError, match=r"pip install .easier\[onnx\]..*nothing was written"):
        fold_run(path, "all", onnx=True)
    capsys.readouterr()  # drop the earlier fold's output (latency warnings on a busy machine)
    assert main(["fold", str(path), "--plan", "all", "--onnx"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("easier: error: ") and "onnx" in err[0]
    assert _snapshot(path) == before  # byte for byte, and no new file


@pytest.mark.slow
def test_torchscript_on_request_and_stale_artifacts_removed(fold_dir):
    import json as _json

    from easier.io.artifacts import FoldOptions, fold_run

    path, model = fold_dir
    fold_run(path, FoldOptions("none", torchscript=True), batch_sizes=(1,))
    xb = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(path / "folded.pt"))(xb), model(xb),
                                   rtol=1e-4, atol=1e-5)
    out = fold_run(path, "none", batch_sizes=(1,))  # TorchScript not asked for this time
    assert out["removed"] == ["folded.pt"] and not (path / "folded.pt").exists()
    notes = _json.loads((path / "fold_plan.json").read_text())["notes"]
    assert any("removed folded.pt" in n for n in notes)


def test_fold_command_plan_batch_reaches_the_plan(fold_dir, capsys):
    import json as _json

    from easier.cli import main

    path, _ = fold_dir
    assert main(["fold", str(path), "--plan", "latency", "--plan-batch", "1,3"]) == 0
    plan = _json.loads((path / "fold_plan.json").read_text())
    timed = [c for c in plan["chains"] if c["timing"]]
    assert timed and all(set(c["timing"]) == {"1", "3"} for c in timed)
    assert plan["batch_sizes"] == [1, 3]
    assert "folded.pt2" in capsys.readouterr().out
    assert main(["fold", str(path), "--plan-batch", "1,0"]) == 2
