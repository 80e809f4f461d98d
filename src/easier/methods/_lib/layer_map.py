"""EGP's site -> layer map: the weight layer that computes a site's pre-activation.

See :func:`site_layers` for the rule; provenance in the docstring of :mod:`easier.methods.egp`.
The walk runs on the model's ``torch.export`` capture (:mod:`easier.capture`), so it works on
any model export captures (Hugging Face models included), with site names from
:mod:`easier.sites`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from easier.errors import SiteError
from easier.graph.sites import KINDS, graph_sites
from easier.methods._lib.graph_walk import LAYERS, capture_for, module_of, norm_input, pass_input

__all__ = ["LayerLink", "site_layers"]

_ADD_OPS = {"add", "add_"}


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
    model: nn.Module,
    node: fx.Node,
    depth: dict[fx.Node, int],
    norm: str | None,
    direct: bool,
    budget: int = 32,
) -> tuple[LayerLink, int] | None:
    """(link, depth of the layer node) for the layer computing ``node``, or None."""
    if budget <= 0 or node.op != "call_function":
        return None
    layer = module_of(model, node, LAYERS)
    if layer is not None:
        return LayerLink(layer, norm, direct), depth[node]
    bn = norm_input(model, node)
    if bn is not None:
        return _walk(model, bn[1], depth, norm or bn[0], direct, budget - 1)
    src = pass_input(node)
    if src is not None:
        return _walk(model, src, depth, norm, direct, budget - 1)
    op = getattr(node.target, "__name__", "").split(".")[0]
    if op in _ADD_OPS and len(node.args) >= 2 and node.kwargs.get("alpha", 1) == 1:
        found = [
            r
            for a in node.args[:2]
            if isinstance(a, fx.Node)
            if (r := _walk(model, a, depth, norm, False, budget - 1)) is not None
        ]
        # the residual branch is the deeper operand; ties keep the first operand
        return max(found, key=lambda r: r[1]) if found else None
    return None


def site_layers(
    model: nn.Module,
    sites: Sequence[str] | None = None,
    kinds: Sequence[str] = KINDS,
    *,
    example_input: Any = None,
) -> dict[str, LayerLink | None]:
    """Map each site (all, or the named ones) to the layer producing its pre-activation, or None.

    Rule: walk back from the pre-activation through BatchNorm modules and dropout to the
    nn.Conv*/nn.Linear that computes it; at an addition take the operand whose layer is deepest
    (the residual branch). ``example_input`` is one model input to capture the model on (default:
    the input its ``easier_spec`` describes); raises :class:`~easier.errors.TraceError` when
    torch.export cannot capture the model (the map needs the graph).
    """
    cap = capture_for(model, example_input, "EGP's site -> layer map",
                      "EGP maps each site to its layer")
    located = {g.site.name: g for g in graph_sites(model, cap, kinds)}
    names = list(located) if sites is None else list(sites)
    unknown = [n for n in names if n not in located]
    if unknown:
        raise SiteError(f"unknown site(s) {unknown}; valid sites: {list(located)}")
    depth = _depths(cap.gm)
    out: dict[str, LayerLink | None] = {}
    for name in names:
        found = _walk(model, located[name].input, depth, None, True)
        out[name] = found[0] if found is not None else None
    return out
