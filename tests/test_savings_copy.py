"""FoldSavings prices each candidate on a copy of one capture that shares its weights.

Checked against an independent computation: the model with those sites linearized and folded
for real (``easier.fold``, plan "flops"), FLOPs counted by ``FlopCounterMode`` on both models;
for one chain also against a hand count. The capture's own weights stay untouched.
"""

import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import easier
from easier.graph.sites import KINDS
from easier.merge.savings import FoldSavings


def _flops(model, x) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def _reference_saving(model, x, sites) -> int:
    """FLOPs of the linearized model minus those of its real flops-planned fold.

    The fold needs the padding moved (``fold_ready``), which makes the first conv of a chain
    run on a padded input; the saving of a removal is against the model as it was, so the
    unmerged side is the plain linearization.
    """
    if not sites:
        return _flops(model, x) - _flops(easier.fold(model, x, plan="flops"), x)
    plain = easier.linearize(model, sites, example_input=x)
    ready = easier.linearize(model, sites, example_input=x, fold_ready=True)
    return _flops(plain, x) - _flops(easier.fold(ready, x, plan="flops"), x)


class ConvReluBN(nn.Module):
    """BN after the activation: removing the ReLU lets the BN fold into the conv before it."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Conv2d(4, 3, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.bn(torch.relu(self.c1(x))))))


class Bottleneck(nn.Module):
    """Wide hidden layers: merging 8 -> 32 -> 8 into one 8 -> 8 layer saves FLOPs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 8, 1), nn.Conv2d(8, 32, 1), nn.Conv2d(32, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


BUILDS = {
    "conv-relu-bn": ConvReluBN,
    "bottleneck": Bottleneck,
}


def _model(name):
    torch.manual_seed(0)
    model = BUILDS[name]().eval()
    for m in model.modules():  # non-trivial BN statistics, so BN folding changes weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 2, 16, 16)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDS))
def test_shared_weight_copy_prices_like_a_real_fold(name, one_thread):
    model, x = _model(name)
    fs = FoldSavings("flops")
    graph = fs.graph(model, x, KINDS)
    before = {k: v.clone() for k, v in graph.gm.state_dict().items()}
    names = list(graph.sites)
    sets = [[]] + [[s] for s in names] + [list(p) for p in itertools.pairwise(names)]
    positive = 0
    for sites in sets:
        got = fs.saving(graph, sites)
        assert got == _reference_saving(model, x, sites), sites
        positive += got > 0
    assert positive > 0, "the check must see some merge that pays"
    after = graph.gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_chain_saving_against_a_hand_count(one_thread):
    model, x = _model("conv-relu-bn")
    fs = FoldSavings("flops")
    graph = fs.graph(model, x, KINDS)
    second = list(graph.sites)[1]  # the ReLU between c2 (3x3, 4 -> 4) and c3 (1x1, 4 -> 3)
    pixels = 2 * 16 * 16  # batch 2, 16 x 16 outputs; FLOPs = 2 * multiply-adds
    unmerged = 2 * pixels * (4 * 4 * 9 + 4 * 3)
    merged = 2 * pixels * (4 * 3 * 9)  # one 3x3 conv, 4 -> 3
    assert fs.saving(graph, [second]) == unmerged - merged
