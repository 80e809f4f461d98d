"""The eager switches that turn activation calls off, or override them, inside a model.

:mod:`easier.linearize` edits models with these; they keep the model's class, module tree and
state_dict keys, so an edited model trains as before and loads a dense model's checkpoint:

* :class:`Linearized` replaces an activation module called once (returns its input);
* :class:`CallSwitch` wraps an activation module and overrides single calls of it (counted per
  forward pass): the identity, or a rule such as Layer Folding's slope mix;
* a functional site ``scope:op@k`` is switched by hooks on its ``scope`` module that run the
  scope's own forward under a ``TorchFunctionMode`` intercepting its k-th ``op`` call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from easier.errors import SiteError
from easier.graph.sites import SWITCH_ATTR, module_kind

__all__ = ["AFFINE_ATTR", "EAGER_OPS", "MODES", "Affine", "CallSwitch", "Linearized", "Rule",
           "add_affine", "ensure_reset_hook", "parse_site", "set_module", "set_site_rule",
           "site_module", "switch_of"]

MODES = ("identity", "affine")  # what a linearized site computes: z, or a*z + b per channel
AFFINE_ATTR = "easier_affine"  # child ModuleDict of the affine replacements of a switch or scope


class Affine(nn.Module):
    """``a * z + b`` per channel: the least-squares linear stand-in for an activation.

    ``a`` and ``b`` are trainable parameters already shaped to broadcast along the site's channel
    axis (``(C, 1, 1)`` for a conv map, ``(C,)`` for features or tokens), so the captured graph
    holds one ``mul`` and one ``add`` by a per-channel parameter, which the fold merges into the
    conv/linear before it exactly. Trainable, because a fine-tune may improve the fit like any
    other weight and the fold absorbs whatever values they end with.
    """

    def __init__(self, shape: tuple[int, ...] | list[int], **like: Any):
        super().__init__()
        self.a = nn.Parameter(torch.ones(tuple(shape), **like))  # like: dtype=, device=
        self.b = nn.Parameter(torch.zeros(tuple(shape), **like))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b


class Linearized(nn.Module):
    """An activation module switched to the identity (or to ``affine``); keeps its parameters."""

    def __init__(self, original: nn.Module, kind: str, affine: Affine | None = None):
        super().__init__()
        self.easier_kind = kind
        self.easier_linearized = True
        self.original_type = type(original).__name__
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.affine = affine

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x if self.affine is None else self.affine(x)

    def extra_repr(self) -> str:
        return f"was {self.original_type}"


Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``rule(pre_activation, activation_output) -> output``: what an overridden site call returns."""


class CallSwitch(nn.Module):
    """An activation module whose calls (0-based, per forward) are overridden one by one.

    A call in ``calls`` is the identity, or ``a * x + b`` when it has an :class:`Affine` in the
    ``easier_affine`` child (keyed by the call number); a call with a rule in ``rules`` returns
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
            affine = getattr(self, AFFINE_ATTR, None)
            return affine[str(i)](x) if affine is not None and str(i) in affine else x
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
EAGER_OPS: dict[Any, str] = {}
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
            EAGER_OPS[_fn] = _op


class _Switch:
    """State of one scope module's functional-site switch (kept as ``SWITCH_ATTR``)."""

    def __init__(self) -> None:
        self.skip: dict[str, set[int]] = {}
        self.rules: dict[tuple[str, int], Rule] = {}  # (op, call) -> rule(x, op(x))
        self.affine: dict[tuple[str, int], Affine] = {}  # skipped calls that return a*x+b
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
        sw, op = self.switch, EAGER_OPS.get(func)
        if op is not None and sw.depth == 0:
            if func is F.hardtanh or func is getattr(F, "hardtanh_", None):
                lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
                op = op if lo == 0 else None
            if op is not None:
                i = sw.count.get(op, 0)
                sw.count[op] = i + 1
                if i in sw.skip.get(op, ()):
                    x = args[0] if args else kwargs.get("input")
                    affine = sw.affine.get((op, i))
                    return x if affine is None else affine(x)
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


def ensure_reset_hook(root: nn.Module) -> None:
    if _reset_counts not in root._forward_pre_hooks.values():
        root.register_forward_pre_hook(_reset_counts)


def add_affine(owner: nn.Module, key: str, shape: tuple[int, ...] | list[int], **like: Any
               ) -> Affine:
    """A new :class:`Affine` kept in ``owner``'s ``easier_affine`` child under ``key``.

    A child, so ``a`` and ``b`` are in the state_dict (``act.easier_affine.0.a``) and train.
    """
    store = getattr(owner, AFFINE_ATTR, None)
    if store is None:
        store = nn.ModuleDict()
        owner.add_module(AFFINE_ATTR, store)
    store[key] = Affine(shape, **like)
    return store[key]  # type: ignore[return-value]


def switch_of(scope: nn.Module) -> _Switch:
    sw = getattr(scope, SWITCH_ATTR, None)
    if sw is None:
        sw = _Switch()
        setattr(scope, SWITCH_ATTR, sw)
        scope.register_forward_pre_hook(_scope_enter)
        scope.register_forward_hook(_scope_exit, always_call=True)
        for child in scope.children():
            _hook_child(sw, child)
    return sw


def _hook_child(sw: _Switch, child: nn.Module) -> None:
    child.register_forward_pre_hook(functools.partial(_child_enter, sw))
    child.register_forward_hook(functools.partial(_child_exit, sw), always_call=True)


# ---------------------------------------------------------------------------------------------
# linearize


def parse_site(name: str) -> tuple[str, str | None, int]:
    """(module path, op or None for a module site, call index)."""
    base, sep, tail = name.rpartition("@")
    if not (sep and tail.isdigit()):
        base, tail = name, "0"
    path, colon, op = base.partition(":")
    return path, (op if colon else None), int(tail)


def site_module(model: nn.Module, path: str, name: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SiteError(f"site {name!r}: the model has no module {path!r}") from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)
    sw = getattr(parent, SWITCH_ATTR, None)
    if sw is not None:  # a new child of a switched scope: its calls are not the scope's own
        _hook_child(sw, module)


def set_site_rule(model: nn.Module, name: str, rule: Rule | None) -> None:
    """Make site ``name`` of ``model`` (in place) return ``rule(x, act(x))``; None undoes it.

    For methods that change what a site computes without removing it (Layer Folding's slope
    mix). A module site's module becomes a :class:`CallSwitch` (and back once it has no rule and
    no linearized call left); a functional site's scope gets the same switch as
    :func:`linearize`, so call numbers stay consistent when both edits touch one scope.
    """
    path, op, call = parse_site(name)
    scope = site_module(model, path, name)
    if op is not None:
        if op not in set(EAGER_OPS.values()):
            raise SiteError(f"site {name!r}: unknown op {op!r}")
        sw = switch_of(scope)
        ensure_reset_hook(model)
        if rule is None:
            sw.rules.pop((op, call), None)
        else:
            sw.rules[(op, call)] = rule
        return
    if isinstance(scope, Linearized) or (isinstance(scope, CallSwitch) and call in scope.calls):
        raise SiteError(f"site {name!r} is linearized")
    if not isinstance(scope, CallSwitch):
        if rule is None:
            return
        kind = module_kind(scope)
        if kind is None:
            raise SiteError(f"site {name!r}: module {path!r} ({type(scope).__name__}) is not an "
                            "activation module")
        scope = CallSwitch(scope, kind)
        set_module(model, path, scope)
        ensure_reset_hook(model)
    if rule is not None:
        scope.rules[call] = rule
        return
    scope.rules.pop(call, None)
    if not scope.rules and not scope.calls:  # nothing left to switch: the plain module again
        inner = scope.inner
        inner._parameters.update(scope._parameters)
        inner._buffers.update(scope._buffers)
        set_module(model, path, inner)
