"""EGP's site -> layer map: the weight layer that computes a site's pre-activation.

See :func:`site_layers` for the rule; provenance in the docstring of :mod:`easier.methods.egp`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import SiteError
from ..sites import KINDS
from .fxgraph import activation_input, site_nodes, trace

__all__ = ["LayerLink", "site_layers"]

_ADD_FNS = {operator.add, operator.iadd, torch.add}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)



@dataclass(frozen=True)
class LayerLink:
    """The weight layer behind a site's pre-activation.

    ``norm`` is the BatchNorm between them (if any); ``direct`` says the pre-activation *is* the
    output of ``norm`` (or of ``layer`` when there is no BN), with no addition in between, so
    zeroing a channel there zeroes that channel of the pre-activation.
    """

    layer: str
    norm: str | None = None
    direct: bool = True


def _depths(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Longest path (in nodes) from any graph input to each node."""
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        depth[node] = 1 + max((depth[a] for a in node.all_input_nodes), default=-1)
    return depth


def _walk(
    gm: fx.GraphModule,
    node: fx.Node,
    depth: dict[fx.Node, int],
    norm: str | None,
    direct: bool,
    budget: int = 32,
) -> tuple[LayerLink, int] | None:
    """(link, depth of the layer node) for the layer computing ``node``, or None."""
    if budget <= 0:
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, _LAYERS):
            return LayerLink(str(node.target), norm, direct), depth[node]
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and node.args:
            return _walk(gm, node.args[0], depth, norm or str(node.target), direct, budget - 1)
        if isinstance(mod, _PASS_MODULES) and node.args:
            return _walk(gm, node.args[0], depth, norm, direct, budget - 1)
        return None
    is_add = (node.op == "call_function" and node.target in _ADD_FNS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if is_add:
        found = [
            r
            for a in node.args[:2]
            if isinstance(a, fx.Node)
            if (r := _walk(gm, a, depth, norm, False, budget - 1)) is not None
        ]
        # the residual branch is the deeper operand; ties keep the first operand
        return max(found, key=lambda r: r[1]) if found else None
    if node.op == "call_function" and node.target is nn.functional.dropout and node.args:
        return _walk(gm, node.args[0], depth, norm, direct, budget - 1)
    return None


def site_layers(
    model: nn.Module, sites: Sequence[str] | None = None, kinds: Sequence[str] = KINDS
) -> dict[str, LayerLink | None]:
    """Map each site (all, or the named ones) to the layer producing its pre-activation, or None.

    See the module docstring for the rule; raises :class:`~easier.errors.TraceError` for models
    torch.fx cannot trace (the map needs the graph).
    """
    gm = trace(model)
    nodes = site_nodes(gm, kinds)
    names = list(nodes) if sites is None else list(sites)
    unknown = [n for n in names if n not in nodes]
    if unknown:
        raise SiteError(f"unknown site(s) {unknown}; valid sites: {list(nodes)}")
    depth = _depths(gm)
    out: dict[str, LayerLink | None] = {}
    for name in names:
        found = _walk(gm, activation_input(nodes[name]), depth, None, True)
        out[name] = found[0] if found is not None else None
    return out
