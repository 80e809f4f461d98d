"""Find activation *call sites*: every place a rectifier is applied in a forward pass.

A site is a call, not a module: one ``nn.ReLU`` called twice is two sites, and ``F.relu(x)``,
``torch.relu(x)`` and ``x.relu_()`` are sites too. Sites are read from a ``torch.export``
capture of the model (:mod:`easier.capture`) and recognised by what they compute:

* an *activation module* is a module whose whole forward is one rectifier: torch's classes
  (``nn.ReLU``, ``ReLU6``, ``LeakyReLU``, ``PReLU``, ``GELU``, ``SiLU``, ``Hardtanh(0, t)``) and any
  parameter-free leaf module that numerically computes one of them on a probe input — Hugging
  Face's ``GELUActivation``, ``NewGELUActivation`` (the tanh formula, no ``gelu`` op at all),
  ``QuickGELUActivation``, ``SiLUActivation``, timm's activation layers;
* any other rectifier op in the graph (``F.relu`` inside a fused BN-act module, ``x.relu_()``,
  ``torch.nn.functional.gelu`` in a forward) is a *functional* site of the module it is written in.

Names are readable and stable:

* a module site is its module path: ``layer1.0.relu1``; the k-th call of the same module
  ``layer1.0.relu@k``;
* a functional site is the module it is written in and the op: ``layer1.0:relu`` (``:relu`` at the
  root), then ``layer1.0:relu@1`` for the next one. Linearized calls keep their numbers, so the
  remaining sites keep their names.

A model that even ``torch.export`` cannot capture falls back to module hooks, with one warning
naming what is lost (functional activations, and modules called more than once).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from easier.errors import ConfigError, NoSitesError, TraceError
from easier.graph.activations import (
    KINDS,
    aten_kind,
    check_kinds,
    module_kind,
    module_sites,
)
from easier.graph.capture import (
    Capture,
    call_model,
    capture,
    default_example,
    eval_mode,
    node_scope,
)
from easier.graph.neuron_axis import concrete_shape, infer_axis

# KINDS, check_kinds, module_kind and module_sites live in easier.activations; importable here too
__all__ = ["KINDS", "SWITCH_ATTR", "EasierWarning", "GraphSite", "Site", "check_kinds",
           "find_sites", "graph_sites", "module_kind", "module_sites"]

SWITCH_ATTR = "_easier_switch"
"""Attribute of a module whose functional sites were edited (see :mod:`easier.linearize`)."""

class EasierWarning(UserWarning):
    """A result is valid but weaker than asked for (e.g. sites lost to the hook fallback)."""


@dataclass(frozen=True)
class Site:
    """One activation call site.

    ``channel_axis`` is where the neurons are: 1 for conv maps (N, C, ...), -1 for token tensors
    (..., C) produced by a Linear; ``None`` when it could not be inferred (entropy then uses axis 1
    for 2-D-or-more inputs). ``shape`` is the pre-activation shape on the example input.
    """

    name: str
    kind: str
    form: str  # "module", "function", or "hook" (fallback: module found without a capture)
    target: str  # module path, or "scope:op" for a functional site
    index: int  # position in execution order
    inplace: bool = False
    channel_axis: int | None = None
    producer: str | None = None
    shape: tuple[int, ...] | None = None
    node: str | None = None  # name of the site's output node in the capture

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Site:
        d = dict(d)
        if d.get("shape") is not None:
            d["shape"] = tuple(d["shape"])
        return cls(**d)


@dataclass
class GraphSite:
    """A site located in a capture: its pre-activation node, output node and all its nodes."""

    site: Site
    input: fx.Node
    output: fx.Node
    nodes: list[fx.Node]


# ---------------------------------------------------------------------------------------------
# sites of a capture


def _call_index(key: str) -> int:
    _head, sep, tail = key.rpartition("@")
    return int(tail) if sep and tail.isdigit() else 0


def _inplace(node: fx.Node) -> bool:
    return str(node.target).split(".")[1].endswith("_") if "." in str(node.target) else False


def _skipped(model: nn.Module, path: str, op: str) -> set[int]:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return set()
    switch = getattr(mod, SWITCH_ATTR, None)
    return set(switch.skipped(op)) if switch is not None else set()


def graph_sites(model: nn.Module, cap: Capture, kinds: Sequence[str] = KINDS) -> list[GraphSite]:
    """Every site of ``model`` in its capture ``cap``, in execution order."""
    kinds = check_kinds(kinds)
    groups: dict[tuple[str, int], list[fx.Node]] = {}  # module sites: (path, call) -> nodes
    order: list[tuple[str, Any]] = []
    counters: dict[tuple[str, str], int] = {}
    found: dict[Any, tuple[str, str, list[fx.Node], str]] = {}
    kind_of: dict[str, str | None] = {}
    for node in cap.gm.graph.nodes:
        if node.op != "call_function":
            continue
        path, _, _key = node_scope(node)
        stack = node.meta.get("nn_module_stack") or {}
        mod_path = None
        for p, _cls in stack.values():  # the outermost activation module on the stack
            if p and p not in kind_of:
                try:
                    kind_of[p] = module_kind(model.get_submodule(p))
                except AttributeError:
                    kind_of[p] = None
            if p and kind_of.get(p):
                mod_path = p
                break
        if mod_path is not None:
            call = next((_call_index(k) for k, (p, _c) in stack.items() if p == mod_path), 0)
            gid = (mod_path, call)
            if gid not in groups:
                groups[gid] = []
                order.append(("module", gid))
            groups[gid].append(node)
            continue
        info = aten_kind(node)
        if info is None:
            continue
        kind, op = info
        skip = _skipped(model, path, op)
        i = counters.get((path, op), 0)
        while i in skip:
            i += 1
        counters[(path, op)] = i + 1
        name = f"{path}:{op}" if i == 0 else f"{path}:{op}@{i}"
        found[name] = (kind, "function", [node], f"{path}:{op}")
        order.append(("function", name))
    out: list[GraphSite] = []
    for form, ident in order:
        if form == "module":
            path, call = ident
            nodes = groups[ident]
            kind = kind_of[path]
            name = path if call == 0 else f"{path}@{call}"
            target = path
        else:
            kind, _, nodes, target = found[ident]
            name = ident
        if kind not in kinds:
            continue
        inside = set(nodes)
        inputs = [a for n in nodes for a in n.all_input_nodes
                  if a not in inside and a.op != "get_attr"]
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if not inputs or len(outputs) != 1:
            continue  # not a one-tensor-in, one-tensor-out call: not a rectifier site
        src, dst = inputs[0], outputs[0]
        axis, producer = infer_axis(src)
        shape = concrete_shape(src.meta.get("val"))
        site = Site(name=name, kind=kind, form="module" if form == "module" else "function",
                    target=target, index=len(out), inplace=any(_inplace(n) for n in nodes),
                    channel_axis=axis, producer=producer, shape=shape, node=dst.name)
        out.append(GraphSite(site, src, dst, nodes))
    return out


# ---------------------------------------------------------------------------------------------
# public entry


def find_sites(
    model: nn.Module,
    example_input: Any = None,
    *,
    kinds: Sequence[str] = KINDS,
    fallback: bool = True,
) -> list[Site]:
    """Return the model's activation call sites in execution order.

    ``example_input`` is one model input: a tensor, a tuple of positional arguments or a dict of
    keyword arguments (e.g. ``{"input_ids": ids}`` for a Hugging Face model). The model is
    captured with ``torch.export`` on it; a model export cannot capture falls back to module hooks
    with an :class:`EasierWarning` (``fallback=False`` raises :class:`TraceError` instead).
    Raises :class:`NoSitesError` when there is no site of the requested kinds.
    """
    kinds = check_kinds(kinds)
    if example_input is None:
        example_input = default_example(model)
    if example_input is None:
        raise ConfigError(
            "find_sites needs an example input to capture the model: pass find_sites(model, x) "
            "with one model input (a tensor, a tuple of arguments or a dict of keyword arguments)"
        )
    try:
        cap = capture(model, example_input)
    except TraceError as exc:
        if not fallback:
            raise
        return sites_by_hooks(model, example_input, kinds, reason=str(exc))
    sites = [g.site for g in graph_sites(model, cap, kinds)]
    if not sites:
        raise NoSitesError(
            f"{type(model).__name__} has no activation call site of kinds {list(kinds)}: looked "
            "for activation modules (by class and by what they compute on a probe input) and "
            "rectifier ops (relu, relu6, leaky_relu, prelu, gelu, silu, hardswish) in its "
            "torch.export graph."
        )
    return sites


# ---------------------------------------------------------------------------------------------
# fallback for models torch.export cannot capture


@torch.no_grad()
def sites_by_hooks(model: nn.Module, example_input: Any, kinds: Sequence[str],
                   reason: str) -> list[Site]:
    """Sites seen by forward-pre-hooks on activation modules (called once per forward only)."""
    mods = module_sites(model, kinds)
    calls: dict[str, list[tuple[int, ...]]] = {name: [] for name in mods}
    order: list[str] = []

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name].append(tuple(args[0].shape))
            if name not in order:
                order.append(name)
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in mods.items()]
    try:
        with eval_mode(model):
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    shared = [n for n in order if len(calls[n]) > 1]
    sites = []
    for name in order:
        if name in shared:
            continue
        shape = calls[name][0]
        axis = 1 if len(shape) != 3 else -1  # 3-D is ambiguous without a graph: assume tokens
        sites.append(Site(name=name, kind=module_kind(mods[name]) or "", form="hook",
                          target=name, index=len(sites),
                          inplace=bool(getattr(mods[name], "inplace", False)),
                          channel_axis=axis, producer=None, shape=shape, node=None))
    lost = (f" Lost: {', '.join(f'{n} (called {len(calls[n])}x)' for n in shared)} — a shared "
            "module's calls cannot be told apart without a graph, so they are not measured."
            if shared else "")
    warnings.warn(
        f"torch.export could not capture {type(model).__name__}, so sites were found with module "
        "hooks: functional activations (F.relu, x.relu(), ...) are invisible and channel axes of "
        f"3-D tensors are guessed as last.{lost} ({reason.splitlines()[0]})",
        EasierWarning,
        stacklevel=3,
    )
    if not sites:
        raise NoSitesError(
            f"{type(model).__name__} has no activation module of kinds {list(kinds)} that the hook "
            "fallback can measure (torch.export cannot capture it, so functional activations and "
            "shared modules are invisible)."
        )
    return sites
