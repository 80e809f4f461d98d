"""Patterns from public architectures that tripped the fold, the relocation and the FLOP count.

Each test is a minimal hand-built module reproducing one pattern (issue 26): an ill-conditioned
linear chain whose float32 rounding exceeds the tolerance while the fold is exact in float64
(inception/rexnet/efficientnet), a block that reads the height/width of a map inside a conv
chain (mobilevitv2), a model that hands a no-grad view of a parameter to a submodule (HF Mamba),
and a network whose layers all feed a concatenation (squeezenet).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import easier
from easier.errors import FoldError
from easier.merge import fold
from easier.perf.measure import measure

pytestmark = pytest.mark.usefixtures("one_thread")


def ill_chain() -> nn.Sequential:
    """Linear 8->64->64->8 whose middle layer nearly cancels the first: outputs of a few hundred
    computed from intermediates of 1e5, so float32 rounding alone is ~1e-1 absolute."""
    g = torch.Generator().manual_seed(0)
    d = torch.float64
    w1 = torch.randn(64, 8, generator=g, dtype=d) * 1e4
    q, _ = torch.linalg.qr(w1)
    w2 = (torch.randn(64, 64, generator=g, dtype=d) @ (torch.eye(64, dtype=d) - q @ q.T)
          + 1e-4 * torch.randn(64, 64, generator=g, dtype=d))
    w3 = torch.randn(8, 64, generator=g, dtype=d)
    m = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    with torch.no_grad():
        for lin, w in zip(m, (w1, w2, w3), strict=True):
            lin.weight.copy_(w.float())
            lin.bias.zero_()
    return m


def test_ill_conditioned_fold_is_accepted_when_exact_in_float64():
    m = ill_chain()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    # independent evidence of the premise: the float32 model is off its own float64 version by
    # far more than rtol=1e-4 allows element by element
    own = (m(x).double() - copy.deepcopy(m).double()(x.double())).abs().max()
    assert own > 1e-3
    folded = fold(m, x, "all")
    assert len(folded.fold_plan.merged) == 1
    assert sum(isinstance(mod, nn.Linear) for mod in folded.modules()) == 1
    assert any("float64 is exact" in n for n in folded.fold_plan.notes)
    # the float32 fold is as close to the float64 truth as the float32 model itself is
    truth = copy.deepcopy(m).double()(x.double())
    assert (folded(x).double() - truth).abs().max() < 10 * own


def test_real_fold_error_is_still_refused_and_names_the_chain():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1))
    x = torch.randn(1, 2, 6, 6)
    plan = easier.plan_fold(m, x, "all")
    plan.chains[0].decision = "merge"  # the naive merge, wrong at the borders
    with pytest.raises(FoldError, match=r"chain\(s\) 0 \(0>1\) are not exact even in float64"):
        fold(m, x, plan)


class PatchBlock(nn.Module):
    """mobilevitv2-like: reads H/W of the map between two convs to cut 2x2 patches after."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.a(x))
        n, c, h, w = y.shape
        z = self.b(y)
        return z.reshape(n, c, h // 2, 2, w // 2, 2).mean((3, 5))


class PlainBlock(PatchBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def test_relocation_that_changes_a_read_shape_is_skipped():
    x = torch.randn(2, 4, 8, 8)
    m = PatchBlock()
    lin = easier.linearize(m, ["act"], example_input=x, fold_ready=True)
    assert lin(x).shape == (2, 8, 4, 4)  # runs (relocating would crash the reshape)
    assert tuple(lin.a.padding) == (0, 0) and tuple(lin.b.padding) == (1, 1)
    # the same chain without the shape read is still relocated (the check is not a blanket skip)
    plain = easier.linearize(PlainBlock(), ["act"], example_input=x, fold_ready=True)
    assert tuple(plain.a.padding) == (1, 1) and tuple(plain.b.padding) == (0, 0)
    # and the relocated plain chain still folds exactly
    folded = fold(plain, x, "all")
    assert len(folded.fold_plan.merged) == 1


class Inner(nn.Module):
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w


class ViewOfParam(nn.Module):
    """Mamba-like: a view of a parameter (made under no_grad) passed into a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 1, 3))
        self.inner = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, self.w.squeeze(1))


def test_flops_counted_when_flop_counter_mode_fails_under_no_grad():
    x = torch.randn(2, 4, 5)
    with pytest.warns(easier.EasierWarning, match="module tracker"):
        r = measure(ViewOfParam(), x, latency=False)
    assert r.flops == 2 * (2 * 4 * 5 * 3)  # hand count: one (2,4,5)@(5,3) matmul, 2 per MAC
    assert r.flops_note and "Expected gradient function" in r.flops_note
    assert r.flops_per_sample == r.flops / 2


def test_concatenating_network_plan_says_why_nothing_folded():
    class Fire(nn.Module):  # squeezenet's fire module, activations already removed
        def __init__(self, c: int) -> None:
            super().__init__()
            self.s = nn.Conv2d(c, 2, 1)
            self.e1, self.e3 = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.s(x)
            return torch.cat([self.e1(y), self.e3(y)], 1)

    plan = easier.plan_fold(nn.Sequential(Fire(4), nn.ReLU(), Fire(6)), torch.randn(1, 4, 6, 6),
                            "all")
    assert not plan.merged
    assert any("cat" in n for n in plan.notes), plan.notes


def test_shape_check_leaves_the_users_model_as_it_was():
    class SameBlock(PatchBlock):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Conv2d(8, 8, 3, padding="same")

    m = SameBlock()
    x = torch.randn(2, 4, 8, 8)
    easier.linearize(m, ["act"], example_input=x, fold_ready=True)
    assert m.b.padding == "same" and tuple(m.a.padding) == (0, 0)  # tried, then restored
