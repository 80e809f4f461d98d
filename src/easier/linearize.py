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

Every edit returns a copy and appends a plain-data record to ``model.easier_edits``;
:func:`apply_edits` replays such a list on a fresh base model, which is how checkpoints are
rebuilt under ``weights_only=True``. Methods may register their own edits with
:func:`register_edit`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .capture import call_model, capture, default_example, eval_mode
from .errors import ConfigError, SiteError, StateError, TraceError
from .padding import conv_paddings, relocate
from .sites import KINDS, SWITCH_ATTR, graph_sites, module_kind

__all__ = ["CallSwitch", "Linearized", "apply_edits", "edits_of", "linearize",
           "linearized_sites", "register_edit", "replace_with_identity"]

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


# ---------------------------------------------------------------------------------------------
# the eager switches


class Linearized(nn.Module):
    """An activation module switched to the identity; keeps the original's parameters."""

    def __init__(self, original: nn.Module, kind: str):
        super().__init__()
        self.easier_kind = kind
        self.easier_linearized = True
        self.original_type = type(original).__name__
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"was {self.original_type}"


Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``rule(pre_activation, activation_output) -> output``: what an overridden site call returns."""


class CallSwitch(nn.Module):
    """An activation module whose calls (0-based, per forward) are overridden one by one.

    A call in ``calls`` is the identity; a call with a rule in ``rules`` returns
    ``rule(x, act(x))`` (e.g. Layer Folding's slope mix); any other call is the module's own. The
    wrapped module is not a child: its parameters and buffers are registered on the switch under
    their own names, so the state_dict keys stay those of the dense model (``act.weight``, not
    ``act.inner.weight``), and its attributes read through (``switch.inplace``).
    """

    def __init__(self, inner: nn.Module, kind: str, calls: Iterable[int] = ()):
        super().__init__()
        for name, p in inner.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in inner.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.__dict__["inner"] = inner  # after the registrations: attributes read through it
        self.easier_kind = kind
        self.calls = set(calls)
        self.rules: dict[int, Rule] = {}
        self.count = 0
        self.seen = 0  # most calls seen in one forward pass (0 = never run)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)

    @property
    def easier_linearized(self) -> bool:
        """Every call seen in a forward pass is the identity (the hook fallback skips it)."""
        return self.seen > 0 and set(range(self.seen)) <= self.calls

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        i, self.count = self.count, self.count + 1
        self.seen = max(self.seen, self.count)
        if i in self.calls:
            return x
        inner = self.inner
        inner._parameters.update(self._parameters)  # .to() / load may have replaced tensors
        inner._buffers.update(self._buffers)
        inner.training = self.training
        rule = self.rules.get(i)
        if rule is None:
            return inner(x, *args, **kwargs)
        return rule(x, inner(x.clone() if getattr(inner, "inplace", False) else x,
                             *args, **kwargs))

    def extra_repr(self) -> str:
        return (f"{type(self.inner).__name__}, identity at calls {sorted(self.calls)}"
                + (f", rules at calls {sorted(self.rules)}" if self.rules else ""))


# torch-level callables -> op name of the sites they create (same names as in sites.py)
_EAGER_OPS: dict[Any, str] = {}
for _fns, _op in (
    ((F.relu, torch.relu, torch.Tensor.relu, getattr(F, "relu_", None), torch.relu_,
      torch.Tensor.relu_), "relu"),
    ((F.relu6, F.hardtanh, getattr(F, "hardtanh_", None)), "relu6"),
    ((F.leaky_relu, getattr(F, "leaky_relu_", None)), "leaky_relu"),
    ((F.prelu, torch.prelu), "prelu"),
    ((F.gelu,), "gelu"),
    ((F.silu,), "silu"),
):
    for _fn in _fns:
        if _fn is not None:
            _EAGER_OPS[_fn] = _op


class _Switch:
    """State of one scope module's functional-site switch (kept as ``SWITCH_ATTR``)."""

    def __init__(self) -> None:
        self.skip: dict[str, set[int]] = {}
        self.rules: dict[tuple[str, int], Rule] = {}  # (op, call) -> rule(x, op(x))
        self.count: dict[str, int] = {}
        self.depth = 0
        self.modes: list[TorchFunctionMode] = []

    def skipped(self, op: str) -> set[int]:
        return self.skip.get(op, set())


class _Override(TorchFunctionMode):
    """Returns the input of the switched calls made by the scope's own forward (depth 0)."""

    def __init__(self, switch: _Switch):
        super().__init__()
        self.switch = switch

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        sw, op = self.switch, _EAGER_OPS.get(func)
        if op is not None and sw.depth == 0:
            if func is F.hardtanh or func is getattr(F, "hardtanh_", None):
                lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
                op = op if lo == 0 else None
            if op is not None:
                i = sw.count.get(op, 0)
                sw.count[op] = i + 1
                if i in sw.skip.get(op, ()):
                    return args[0] if args else kwargs.get("input")
                rule = sw.rules.get((op, i))
                if rule is not None and args:
                    x = args[0]
                    inplace = (getattr(func, "__name__", "").endswith("_")
                               or kwargs.get("inplace") is True
                               or any(a is True for a in args[1:]))
                    return rule(x, func(x.clone() if inplace else x, *args[1:], **kwargs))
        return func(*args, **kwargs)


def _scope_enter(module: nn.Module, args: Any) -> None:
    sw: _Switch = getattr(module, SWITCH_ATTR)
    sw.depth = 0
    mode = _Override(sw)
    mode.__enter__()
    sw.modes.append(mode)


def _scope_exit(module: nn.Module, args: Any, out: Any) -> None:
    sw: _Switch = getattr(module, SWITCH_ATTR)
    if sw.modes:
        sw.modes.pop().__exit__(None, None, None)


def _child_enter(sw: _Switch, module: nn.Module, args: Any) -> None:
    sw.depth += 1


def _child_exit(sw: _Switch, module: nn.Module, args: Any, out: Any) -> None:
    sw.depth -= 1


def _reset_counts(root: nn.Module, args: Any) -> None:
    """Root forward pre-hook: call counters restart at every forward pass."""
    for m in root.modules():
        sw = getattr(m, SWITCH_ATTR, None)
        if sw is not None:
            sw.count.clear()
        if isinstance(m, CallSwitch):
            m.count = 0


def _ensure_reset_hook(root: nn.Module) -> None:
    if _reset_counts not in root._forward_pre_hooks.values():
        root.register_forward_pre_hook(_reset_counts)


def _switch_of(scope: nn.Module) -> _Switch:
    sw = getattr(scope, SWITCH_ATTR, None)
    if sw is None:
        sw = _Switch()
        setattr(scope, SWITCH_ATTR, sw)
        scope.register_forward_pre_hook(_scope_enter)
        scope.register_forward_hook(_scope_exit, always_call=True)
        for child in scope.children():
            child.register_forward_pre_hook(functools.partial(_child_enter, sw))
            child.register_forward_hook(functools.partial(_child_exit, sw), always_call=True)
    return sw


# ---------------------------------------------------------------------------------------------
# linearize


def _parse(name: str) -> tuple[str, str | None, int]:
    """(module path, op or None for a module site, call index)."""
    base, sep, tail = name.rpartition("@")
    if not (sep and tail.isdigit()):
        base, tail = name, "0"
    path, colon, op = base.partition(":")
    return path, (op if colon else None), int(tail)


def _submodule(model: nn.Module, path: str, name: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SiteError(f"site {name!r}: the model has no module {path!r}") from None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def linearize(
    model: nn.Module,
    sites: Iterable[str],
    *,
    example_input: Any = None,
    fold_ready: bool = False,
    kinds: Sequence[str] = KINDS,
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
    ``fold_ready=True`` (needs
    ``example_input``) also moves the zero padding of each conv chain that a removed activation
    joins to the chain's first conv: that changes the function at the image borders (fine-tuning
    adapts to it) and makes the later :func:`easier.fold` of the chain exact.
    """
    names = list(sites)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SiteError(f"site(s) {dup} given more than once")
    done = linearized_sites(model)
    for name in names:
        if name in done:
            raise SiteError(f"site {name!r} is already linearized")
    if example_input is None:
        example_input = default_example(model)
    if fold_ready and example_input is None:
        raise ConfigError("linearize(fold_ready=True) needs example_input= to find conv chains")
    padding: dict[str, list[int]] = {}
    modules = {_parse(n)[0] for n in names if _parse(n)[1] is None}
    # module sites that get a CallSwitch: called more than once, or not known to be called once
    shared = {_parse(n)[0] for n in [*names, *done] if _parse(n)[2] > 0 and _parse(n)[1] is None}
    if example_input is None:
        shared |= modules  # without a run, a module's other calls cannot be ruled out
    else:
        try:
            cap = capture(model, example_input)
        except TraceError:
            cap = None  # the hook fallback: count each module's calls in one run
        if cap is not None:
            located = {g.site.name: g for g in graph_sites(model, cap, kinds)}
            unknown = [n for n in names if n not in located]
            if unknown:
                raise SiteError(f"unknown site(s) {unknown}; valid sites: {list(located)}")
            shared |= {_parse(n)[0] for n in located if _parse(n)[2] > 0 and _parse(n)[1] is None}
            if fold_ready:
                padding = relocate(model, cap, [located[n] for n in names])
        else:
            shared |= {p for p, n in _module_calls(model, example_input, modules).items() if n > 1}
    shared &= modules
    new = _apply_linearize(copy.deepcopy(model), names, padding, shared)
    edit = {"op": "linearize", "sites": names, "fold_ready": bool(fold_ready),
            "padding": padding, "shared": sorted(shared)}
    return record_edit(new, model, edit)


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
                     shared: set[str]) -> nn.Module:
    """Switch the named sites off in ``new`` (in place) and set relocated paddings.

    ``shared`` lists activation modules called more than once per forward: they get a
    :class:`CallSwitch`, every other module site a :class:`Linearized`.
    """
    for name in names:
        path, op, call = _parse(name)
        scope = _submodule(new, path, name)
        if op is not None:
            if op not in set(_EAGER_OPS.values()):
                raise SiteError(f"site {name!r}: unknown op {op!r}")
            _switch_of(scope).skip.setdefault(op, set()).add(call)
            _ensure_reset_hook(new)
            continue
        kind = module_kind(scope)
        if kind is None:
            raise SiteError(f"site {name!r}: module {path!r} ({type(scope).__name__}) is not an "
                            "activation module")
        if isinstance(scope, CallSwitch):
            scope.calls.add(call)
        elif isinstance(scope, Linearized):
            raise SiteError(f"site {name!r} is already linearized")
        elif path not in shared:
            _set(new, path, Linearized(scope, kind))
        else:
            _set(new, path, CallSwitch(scope, kind, [call]))
            _ensure_reset_hook(new)
    conv_paddings(new, padding)
    return new


@register_edit("linearize")
def _replay_linearize(model: nn.Module, sites: list[str], fold_ready: bool = False,
                      padding: dict[str, list[int]] | None = None,
                      shared: list[str] | None = None) -> nn.Module:
    new = _apply_linearize(copy.deepcopy(model), list(sites), dict(padding or {}),
                           set(shared or ()))
    return record_edit(new, model, {"op": "linearize", "sites": list(sites),
                                    "fold_ready": bool(fold_ready), "padding": padding or {},
                                    "shared": list(shared or [])})


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
        _set(new, name, nn.Identity())
    return record_edit(new, model, {"op": "identity", "modules": names})
