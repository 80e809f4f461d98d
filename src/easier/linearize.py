"""Edits that make a model more linear, recorded so a saved model can be rebuilt.

:func:`linearize` replaces activation sites by identity (an fx graph rewrite);
:func:`replace_with_identity` replaces whole modules (blocks) by identity. Every edit returns a
copy and appends a plain-data record to ``model.easier_edits``; :func:`apply_edits` replays such
a list on a fresh base model, which is how checkpoints are rebuilt under ``weights_only=True``.
Methods may register their own edits with :func:`register_edit`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import fx, nn

from .errors import SiteError, StateError, TraceError
from .sites import KINDS, activation_input, module_sites, site_nodes, trace

__all__ = ["apply_edits", "edits_of", "linearize", "linearized_sites", "register_edit",
           "replace_with_identity"]

_EDITS = "easier_edits"  # list of edit records, kept on every edited module
_CARRIED = ("easier_spec",)  # attributes a copy keeps
_EDIT_OPS: dict[str, Callable[..., nn.Module]] = {}


def register_edit(op: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``fn(model, **args) -> model`` so records ``{"op": op, **args}`` can be replayed."""
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _EDIT_OPS[op] = fn
        return fn
    return deco


def edits_of(model: nn.Module) -> list[dict[str, Any]]:
    """The edits applied to ``model`` so far (oldest first), as plain data."""
    return copy.deepcopy(list(getattr(model, _EDITS, [])))


def apply_edits(base: nn.Module, edits: Iterable[dict[str, Any]]) -> nn.Module:
    """Replay recorded edits on a fresh base model."""
    model = base
    for edit in edits:
        args = dict(edit)
        op = args.pop("op", None)
        if op not in _EDIT_OPS:
            from . import methods  # noqa: F401  (methods register their own edits on import)
        if op not in _EDIT_OPS:
            raise StateError(f"unknown edit {op!r} in a checkpoint; known: {sorted(_EDIT_OPS)}")
        model = _EDIT_OPS[op](model, **args)
    return model


def record_edit(new: nn.Module, old: nn.Module, edit: dict[str, Any]) -> nn.Module:
    """Give ``new`` the edit history of ``old`` plus ``edit``, and carry easier's attributes."""
    for attr in _CARRIED:
        if hasattr(old, attr) and not hasattr(new, attr):
            setattr(new, attr, copy.deepcopy(getattr(old, attr)))
    setattr(new, _EDITS, [*edits_of(old), edit])
    return new


def linearized_sites(model: nn.Module) -> list[str]:
    """Names of the sites that :func:`linearize` has removed from ``model`` (oldest first)."""
    return [s for e in edits_of(model) if e["op"] == "linearize" for s in e["sites"]]


def fold_ready_model(model: nn.Module) -> bool:
    """Whether a linearization of ``model`` moved conv padding (see ``fold_ready``)."""
    return any(e.get("fold_ready") for e in edits_of(model) if e["op"] == "linearize")


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
    edit = {"op": "linearize", "sites": names, "fold_ready": bool(fold_ready)}
    new = copy.deepcopy(model)
    try:
        gm = trace(new)
    except TraceError:
        return record_edit(_swap_modules(new, names, done, kinds), model, edit)
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
    if fold_ready and junctions:
        from .folding import relocate_padding

        relocate_padding(gm, junctions)
    return record_edit(gm, model, edit)


register_edit("linearize")(lambda model, sites, fold_ready=False: linearize(
    model, sites, fold_ready=fold_ready))


@register_edit("identity")
def replace_with_identity(model: nn.Module, modules: Iterable[str]) -> nn.Module:
    """Return a copy of ``model`` in which the named submodules (whole blocks) are identities.

    Each module must map its input to an output of the same shape (e.g. a non-downsampling
    residual block); that is checked when the model runs, not here. Works on the model's own
    module tree, so it is for models that were not flattened into an fx graph by an earlier edit.
    """
    names = list(modules)
    if isinstance(model, fx.GraphModule):
        raise SiteError(
            "replace_with_identity works on a model's module tree, but this model is an fx graph "
            "(its blocks were inlined by an earlier edit); replace blocks before linearizing"
        )
    valid = {n for n, _ in model.named_modules() if n}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SiteError(f"unknown module(s) {unknown}; e.g. {sorted(valid)[:10]}")
    new = copy.deepcopy(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, leaf, nn.Identity())
    return record_edit(new, model, {"op": "identity", "modules": names})


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


def _swap_modules(new: nn.Module, names: list[str], done: list[str],
                  kinds: Sequence[str]) -> nn.Module:
    """Fallback for untraceable models: swap whole activation modules of the copy for Identity."""
    mods = module_sites(new, kinds)
    _check_names(names, [n for n in mods if n not in done], done)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, leaf, nn.Identity())
    return new

