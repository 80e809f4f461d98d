"""Replace activation sites by identity, in a copy of the model, by rewriting its fx graph."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from torch import fx, nn

from .errors import SiteError, TraceError
from .sites import KINDS, activation_input, module_sites, site_nodes, trace

__all__ = ["linearize", "linearized_sites"]

_ATTR = "easier_linearized"  # list of site names removed so far, kept on the returned module
_READY = "easier_fold_ready"


def linearized_sites(model: nn.Module) -> list[str]:
    """Names of the sites that :func:`linearize` has removed from ``model`` (oldest first)."""
    return list(getattr(model, _ATTR, []))


def linearize(
    model: nn.Module,
    sites: Iterable[str],
    *,
    fold_ready: bool = False,
    kinds: Sequence[str] = KINDS,
) -> nn.Module:
    """Return a copy of ``model`` in which the named activation sites compute the identity.

    The copy is a ``torch.fx.GraphModule`` whose graph no longer contains the site calls, so it
    runs, trains and exports like any module; parameters and buffers keep their names, so
    ``state_dict``s load across the original and the copy. ``model`` itself is not modified.
    The removed names are recorded (:func:`linearized_sites`), so a saved model is rebuilt from its
    architecture, this list and a ``state_dict``.

    ``fold_ready=True`` also moves the zero padding of each conv chain that a removed activation
    joins to the chain's first conv. That changes the function at the image borders (fine-tuning
    adapts to it) and makes the later :func:`easier.fold` of the chain exact; see the README.

    Models fx cannot trace fall back to swapping activation *modules* for ``nn.Identity`` (the
    result keeps the model's class); functional and shared activations cannot be linearized then.
    """
    names = list(sites)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SiteError(f"site(s) {dup} given more than once")
    done = linearized_sites(model)
    try:
        trace(model)  # cheap check of traceability on the original before copying
    except TraceError:
        return _linearize_modules(model, names, done, kinds)

    new = copy.deepcopy(model)
    gm = trace(new)
    nodes = site_nodes(gm, kinds)
    _check_names(names, list(nodes), done)
    junctions: list[fx.Node] = []
    for name in names:
        node = nodes[name]
        src = activation_input(node)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        junctions.append(src)
    gm.graph.lint()
    gm.recompile()
    if gm is not new:
        _keep_unreferenced_state(gm, new)
        gm.train(model.training)
        for attr in ("easier_spec",):
            if hasattr(model, attr):
                setattr(gm, attr, copy.deepcopy(getattr(model, attr)))
    ready = bool(getattr(model, _READY, False)) or fold_ready
    if fold_ready and junctions:
        from .fold import relocate_padding

        relocate_padding(gm, junctions)
    setattr(gm, _ATTR, done + names)
    setattr(gm, _READY, ready)
    return gm


def _check_names(names: list[str], valid: list[str], done: list[str]) -> None:
    for name in names:
        if name in done:
            raise SiteError(f"site {name!r} is already linearized; remaining sites: {valid}")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SiteError(f"unknown site(s) {unknown}; valid sites: {valid}")


def _keep_unreferenced_state(gm: fx.GraphModule, source: nn.Module) -> None:
    """fx drops submodules the forward never calls; put them back so state_dict keys match."""
    have = set(gm.state_dict())
    owners: dict[str, nn.Module] = {}
    for key in source.state_dict():
        if key not in have:
            path = key.rpartition(".")[0]
            if path and path not in owners:
                owners[path] = source.get_submodule(path)
    for path, mod in sorted(owners.items()):
        try:
            gm.get_submodule(path)
        except AttributeError:
            gm.add_submodule(path, mod)


def _linearize_modules(model: nn.Module, names: list[str], done: list[str],
                       kinds: Sequence[str]) -> nn.Module:
    """Fallback for untraceable models: swap whole activation modules for nn.Identity."""
    new = copy.deepcopy(model)
    mods = module_sites(new, kinds)
    _check_names(names, [n for n in mods if n not in done], done)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, leaf, nn.Identity())
    setattr(new, _ATTR, done + names)
    return new

