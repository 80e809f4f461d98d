"""Edits that make a model more linear, done on the user's *eager* module and recorded.

:func:`linearize` makes activation call sites compute the identity; :func:`replace_with_identity`
replaces whole modules (blocks). The edited model keeps its class, its module tree and every
parameter and buffer name, so it trains exactly as before (BN statistics, dropout, DDP, AMP) and
``state_dict``s load across. How a site is switched off:

* an activation module called once is replaced by :class:`Linearized` (returns its input, keeps
  the module's parameters, e.g. a PReLU's weight);
* the k-th call of a shared activation module (or any module site when no example input says
  how often it is called): the module is wrapped in a :class:`CallSwitch` that skips the
  linearized calls (counted per forward pass) and keeps the module's state_dict keys;
* a functional site ``scope:op@k``: the ``scope`` module gets forward hooks that run its
  forward under a ``TorchFunctionMode`` returning the input of its k-th ``op`` call.

``mode="affine"`` makes a site compute ``a * z + b`` per channel instead of ``z`` (an
:class:`easier.edit.switches.Affine` whose ``a``, ``b`` come from
:func:`easier.edit.affine.fit_affine`).

Every edit returns a copy and appends a plain-data record to ``model.easier_edits``;
:func:`apply_edits` replays such a list on a fresh base model, which is how checkpoints are
rebuilt under ``weights_only=True``. Methods may register their own edits with
:func:`register_edit`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from easier.edit.padding import conv_paddings, relocate
from easier.edit.switches import (
    AFFINE_ATTR,
    EAGER_OPS,
    MODES,
    Affine,
    CallSwitch,
    Linearized,
    Rule,
    add_affine,
    ensure_reset_hook,
    parse_site,
    set_module,
    set_site_rule,
    site_module,
    switch_of,
)
from easier.errors import ConfigError, SiteError, StateError, TraceError
from easier.graph.capture import call_model, default_example, eval_mode
from easier.graph.capture import capture as capture_model
from easier.graph.sites import KINDS, graph_sites, module_kind

__all__ = ["MODES", "Affine", "CallSwitch", "Linearized", "Rule", "apply_edits", "edits_of",
           "linearize", "linearized_sites", "register_edit", "replace_with_identity",
           "set_site_rule"]

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


# ---------------------------------------------------------------------------------------------
# linearize


def linearize(
    model: nn.Module,
    sites: Iterable[str],
    *,
    example_input: Any = None,
    fold_ready: bool = False,
    kinds: Sequence[str] = KINDS,
    capture: bool = True,
    mode: str = "identity",
    fits: dict[str, Any] | None = None,
) -> nn.Module:
    """Return a copy of ``model`` in which the named activation sites compute the identity.

    The copy is the same eager module (same class and module tree, see the module doc); ``model``
    itself is not modified. Parameters and buffers keep their names. The removed names are
    recorded (:func:`linearized_sites`), so a saved model is rebuilt from its architecture, this
    list and a ``state_dict``.

    With ``example_input`` (one model input) the names are checked against the sites of a
    capture, so a wrong name fails with the list of valid ones, and a module called once is
    swapped for :class:`Linearized`; without one, module sites get a :class:`CallSwitch` that
    switches off only the named call (correct whether or not the module is shared).
    ``capture=False`` skips the capture even when an example input is known (fast, e.g. to score
    many candidates; the function is the same, names are checked structurally).
    ``fold_ready=True`` (needs
    ``example_input``) also moves the zero padding of each conv chain that a removed activation
    joins to the chain's first conv: that changes the function at the image borders (fine-tuning
    adapts to it) and makes the later :func:`easier.fold` of the chain exact.
    ``mode="affine"`` replaces each site by the per-channel map ``a * z + b`` given in ``fits``
    (``{site: AffineFit}`` from :func:`easier.edit.affine.fit_affine` on this model); ``a`` and
    ``b`` become trainable parameters of the copy, and the fold merges them exactly.
    """
    names = list(sites)
    shapes = _affine_shapes(names, mode, fits)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SiteError(f"site(s) {dup} given more than once")
    done = linearized_sites(model)
    for name in names:
        if name in done:
            raise SiteError(f"site {name!r} is already linearized")
    if not capture:
        example_input = None
    elif example_input is None:
        example_input = default_example(model)
    if fold_ready and example_input is None:
        raise ConfigError("linearize(fold_ready=True) needs example_input= to find conv chains")
    padding: dict[str, list[int]] = {}
    modules = {parse_site(n)[0] for n in names if parse_site(n)[1] is None}
    # module sites that get a CallSwitch: called more than once, or not known to be called once
    shared = _later_calls([*names, *done])
    if example_input is None:
        shared |= modules  # without a run, a module's other calls cannot be ruled out
    else:
        try:
            cap = capture_model(model, example_input)
        except TraceError:
            cap = None  # the hook fallback: count each module's calls in one run
        if cap is not None:
            located = {g.site.name: g for g in graph_sites(model, cap, kinds)}
            unknown = [n for n in names if n not in located]
            if unknown:
                raise SiteError(f"unknown site(s) {unknown}; valid sites: {list(located)}")
            shared |= _later_calls(located)
            if fold_ready:
                padding = relocate(model, cap, [located[n] for n in names])
        else:
            shared |= {p for p, n in _module_calls(model, example_input, modules).items() if n > 1}
    shared &= modules
    new = _apply_linearize(copy.deepcopy(model), names, padding, shared, shapes)
    edit = {"op": "linearize", "sites": names, "fold_ready": bool(fold_ready),
            "padding": padding, "shared": sorted(shared)}
    if shapes:  # identity records stay as before, so old checkpoints and new ones compare equal
        edit.update(mode="affine", shapes=shapes)
        _set_fits(new, fits or {}, names)
    return record_edit(new, model, edit)


def _affine_shapes(names: list[str], mode: str, fits: dict[str, Any] | None
                   ) -> dict[str, list[int]]:
    """{site: parameter shape} for an affine linearization; {} for the identity."""
    if mode not in MODES:
        raise ConfigError(f"linearize mode={mode!r}; valid modes: {list(MODES)}")
    if mode == "identity":
        return {}
    missing = [n for n in names if n not in (fits or {})]
    if missing:
        raise ConfigError(f"linearize(mode='affine') needs fits for {missing}: pass "
                          "fits=easier.edit.affine.fit_affine(model, data, sites)")
    return {n: list(fits[n].a.shape) for n in names}  # type: ignore[index]


def _affines(model: nn.Module, names: list[str]) -> dict[str, Affine]:
    """The :class:`Affine` of each named (affine-linearized) site of ``model``."""
    out: dict[str, Affine] = {}
    for name in names:
        path, op, call = parse_site(name)
        scope = model.get_submodule(path)
        if op is not None:
            out[name] = switch_of(scope).affine[(op, call)]
        elif isinstance(scope, Linearized):
            out[name] = scope.affine  # type: ignore[assignment]
        else:
            out[name] = getattr(scope, AFFINE_ATTR)[str(call)]
    return out


@torch.no_grad()
def _set_fits(model: nn.Module, fits: dict[str, Any], names: list[str]) -> None:
    for name, affine in _affines(model, names).items():
        affine.a.copy_(fits[name].a.reshape(affine.a.shape))
        affine.b.copy_(fits[name].b.reshape(affine.b.shape))


def _later_calls(names: Iterable[str]) -> set[str]:
    """Module paths of the module sites named by a call index > 0 (so called more than once)."""
    return {p for p, op, call in map(parse_site, names) if op is None and call > 0}


@torch.no_grad()
def _module_calls(model: nn.Module, example_input: Any, paths: Iterable[str]) -> dict[str, int]:
    """How many times each named module is called in one eval-mode forward pass."""
    counts: dict[str, int] = {}
    handles = []
    for path in paths:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue  # a bad name fails with its own message in _apply_linearize
        counts[path] = 0

        def count(_m: nn.Module, _a: Any, path: str = path) -> None:
            counts[path] += 1

        handles.append(mod.register_forward_pre_hook(count))
    try:
        with eval_mode(model):
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return counts


def _apply_linearize(new: nn.Module, names: list[str], padding: dict[str, list[int]],
                     shared: set[str], shapes: dict[str, list[int]] | None = None) -> nn.Module:
    """Switch the named sites off in ``new`` (in place) and set relocated paddings.

    ``shared`` lists activation modules called more than once per forward: they get a
    :class:`CallSwitch`, every other module site a :class:`Linearized`. A site in ``shapes``
    gets an :class:`Affine` of that shape (values set by the caller, or loaded).
    """
    shapes = shapes or {}
    ref = next((p for p in new.parameters() if p.is_floating_point()), None)
    like = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
    for name in names:
        path, op, call = parse_site(name)
        scope = site_module(new, path, name)
        shape = shapes.get(name)
        if op is not None:
            if op not in set(EAGER_OPS.values()):
                raise SiteError(f"site {name!r}: unknown op {op!r}")
            sw = switch_of(scope)
            sw.skip.setdefault(op, set()).add(call)
            if shape is not None:
                sw.affine[(op, call)] = add_affine(scope, f"{op}_{call}", shape, **like)
            ensure_reset_hook(new)
            continue
        kind = module_kind(scope)
        if kind is None:
            raise SiteError(f"site {name!r}: module {path!r} ({type(scope).__name__}) is not an "
                            "activation module")
        if isinstance(scope, Linearized):
            raise SiteError(f"site {name!r} is already linearized")
        if not isinstance(scope, CallSwitch) and path not in shared:
            set_module(new, path, Linearized(scope, kind, None if shape is None
                                             else Affine(shape, **like)))
            continue
        if not isinstance(scope, CallSwitch):
            scope = CallSwitch(scope, kind)
            set_module(new, path, scope)
            ensure_reset_hook(new)
        scope.calls.add(call)
        if shape is not None:
            add_affine(scope, str(call), shape, **like)
    conv_paddings(new, padding)
    return new

@register_edit("linearize")
def _replay_linearize(model: nn.Module, sites: list[str], fold_ready: bool = False,
                      padding: dict[str, list[int]] | None = None,
                      shared: list[str] | None = None, mode: str = "identity",
                      shapes: dict[str, list[int]] | None = None) -> nn.Module:
    # a record without mode/shapes (every checkpoint before affine mode) is the identity
    new = _apply_linearize(copy.deepcopy(model), list(sites), dict(padding or {}),
                           set(shared or ()), dict(shapes or {}) if mode == "affine" else None)
    edit = {"op": "linearize", "sites": list(sites), "fold_ready": bool(fold_ready),
            "padding": padding or {}, "shared": list(shared or [])}
    if mode == "affine":
        edit.update(mode="affine", shapes=dict(shapes or {}))
    return record_edit(new, model, edit)


@register_edit("identity")
def replace_with_identity(model: nn.Module, modules: Iterable[str]) -> nn.Module:
    """Return a copy of ``model`` in which the named submodules (whole blocks) are identities.

    Each module must map its input to an output of the same shape (e.g. a non-downsampling
    residual block); that is checked when the model runs, not here.
    """
    names = list(modules)
    valid = {n for n, _ in model.named_modules() if n}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SiteError(f"unknown module(s) {unknown}; e.g. {sorted(valid)[:10]}")
    new = copy.deepcopy(model)
    for name in names:
        set_module(new, name, nn.Identity())
    return record_edit(new, model, {"op": "identity", "modules": names})
