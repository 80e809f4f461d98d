"""FoldSavings prices each candidate on a copy of one capture that shares its weights.

Checked against the straightforward way (a full deep copy of the capture, recompiled, prepared
as the fold does): same FLOPs saving for every single site and every adjacent pair, and the
capture's own weights are untouched after all of them.
"""

import copy
import itertools

import pytest
import torch
from torch import nn

from easier import models
from easier.graph.sites import KINDS
from easier.merge.chains import find_chains
from easier.merge.graph import prepare_graph
from easier.merge.savings import FoldSavings


def _reference_saving(fs, graph, sites):
    gm = copy.deepcopy(graph.gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in sites:
        src, dst = (nodes[n] for n in graph.sites[name])
        dst.replace_all_uses_with(src)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm, _ = prepare_graph(gm, graph.example)
    total = 0.0
    for chain in find_chains(gm):
        cand = fs._price(gm, chain)  # the price of one chain (FLOPs: deterministic)
        total += cand.saving
    return total


class ConvReluBN(nn.Module):
    """BN after the activation: removing the ReLU lets the BN fold into the conv before it."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Conv2d(4, 3, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.bn(torch.relu(self.c1(x))))))


@pytest.mark.parametrize("build", [
    lambda: models.create("mobilenet_v2", num_classes=10, in_channels=1, width=0.25,
                          image_size=16),
    lambda: models.create("resnet18", num_classes=10, in_channels=1, width=0.25, image_size=16),
    ConvReluBN,
], ids=["mobilenet_v2", "resnet18", "conv-relu-bn"])
def test_shared_weight_copy_prices_like_a_full_copy(build, one_thread):
    torch.manual_seed(0)
    model = build().eval()
    for m in model.modules():  # non-trivial BN statistics, so BN folding changes weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    in_ch = 2 if isinstance(model, ConvReluBN) else 1
    x = torch.randn(2, in_ch, 16, 16)
    fs = FoldSavings("flops")
    graph = fs.graph(model, x, KINDS)
    before = {k: v.clone() for k, v in graph.gm.state_dict().items()}
    names = list(graph.sites)
    sets = [[]] + [[s] for s in names] + [list(p) for p in itertools.pairwise(names)]
    for sites in sets[:40]:
        assert fs.saving(graph, sites) == _reference_saving(fs, graph, sites), sites
    after = graph.gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
